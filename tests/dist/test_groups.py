"""The process groups built on every rank equal the plan's rank lists (gloo, 2, 4 and 8 processes).

For each layout, every rank compares, axis by axis (tp, pp, dp, ep, edp, mp, embedding), the members
of its ParallelGroups entry and of the real process group with ``plan.ranks.group(axis, rank)``, and
all-reduces its rank id over each group: the sum must be the sum of the plan's members (the group
really connects those ranks). Also: a world-size mismatch raises ValueError naming both numbers, and
the optional DeviceMesh has the plan's pp/dp/tp groups.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from _equivalence import compose_run_config
from hpframe.testing.distributed import run_distributed


def _layout(overrides: list[str]) -> Any:
    return compose_run_config("mixtral_debug", ["model.num_layers=4", *overrides])


def _groups_worker(rank: int, world_size: int, layouts: list[tuple[str, Any]], mismatch: Any) -> list[dict[str, Any]]:
    from hpframe.parallel import AXES, build_groups, init_distributed
    from hpframe.plan import make_plan

    out = []
    for name, cfg in layouts:
        plan = make_plan(cfg, world_size)
        groups = init_distributed(plan)  # already initialized by the harness: checks the size, builds groups
        rec: dict[str, Any] = {"layout": name, "rank": rank, "axes": {}}
        for axis in AXES:
            expected = plan.ranks.group(axis, rank)
            pg = groups.group(axis)
            total = torch.tensor([float(rank)])
            dist.all_reduce(total, group=pg)
            rec["axes"][axis] = {
                "expected": tuple(expected),
                "held": groups.ranks[axis],
                "process_group": tuple(dist.get_process_group_ranks(pg)),
                "sum": total.item(),
            }
        coords = plan.ranks.coords(rank)
        rec["local"] = {a: (groups.local_rank(a), coords[a]) for a in ("tp", "dp", "ep")}
        out.append(rec)
    try:
        build_groups(make_plan(mismatch, 2 * world_size))
    except ValueError as e:
        out.append({"mismatch_error": str(e)})
    return out


def _check(results: list[list[dict[str, Any]]], world_size: int) -> None:
    assert len(results) == world_size
    for rank_results in results:
        *records, err = rank_results
        assert "the plan needs" in err["mismatch_error"] and str(world_size) in err["mismatch_error"], err
        assert str(2 * world_size) in err["mismatch_error"], err
        for rec in records:
            for axis, a in rec["axes"].items():
                tag = (rec["layout"], rec["rank"], axis)
                assert a["held"] == a["expected"] == a["process_group"], (tag, a)
                assert a["sum"] == float(sum(a["expected"])), (tag, a)
            for axis, (pos, coord) in rec["local"].items():
                assert pos == coord, (rec["layout"], rec["rank"], axis, pos, coord)


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_groups_two_and_four_processes() -> None:
    two = [
        ("tp2", _layout(["parallel.tp=2", "parallel.dp=1"])),
        ("dp2_ep2", _layout(["parallel.dp=2", "parallel.ep=2"])),
        ("pp2", _layout(["parallel.pp=2", "parallel.dp=1"])),
    ]
    _check(run_distributed(_groups_worker, 2, (two, _layout([])), timeout=200), 2)
    four = [
        ("pp2_dp2", _layout(["parallel.pp=2", "parallel.dp=2"])),
        ("tp2_dp2_ep2", _layout(["parallel.tp=2", "parallel.dp=2", "parallel.ep=2"])),
        ("dp4_ep2_order_tp_dp", _layout(["parallel.dp=4", "parallel.ep=2", "parallel.axis_order=tp-pp-dp"])),
        ("tp2_pp2_order_dp_outer", _layout(["parallel.tp=2", "parallel.pp=2", "parallel.dp=1", "parallel.axis_order=dp-tp-pp"])),
    ]
    _check(run_distributed(_groups_worker, 4, (four, _layout([])), timeout=200), 4)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_groups_tp2_pp2_dp2_eight_processes() -> None:
    layouts = [("tp2_pp2_dp2_ep2", _layout(["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2"]))]
    _check(run_distributed(_groups_worker, 8, (layouts, _layout([])), timeout=280), 8)
