"""engine/topology.py against plan.ranks: DeepSpeed's ProcessTopology and the PlanMPU adapter give the
same coordinates and rank lists as hpframe's RankLayout, for many shapes and axis orders (no processes)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from hpframe.engine.topology import PlanMPU, check_topology, process_topology, topology_rank_lists
from hpframe.plan.ranks import RankLayout

SHAPES = [(1, 1, 2), (2, 1, 1), (1, 2, 1), (2, 2, 2), (2, 2, 4), (4, 2, 2), (1, 4, 2), (2, 4, 1), (8, 2, 4)]
ORDERS = ["pp-dp-tp", "dp-pp-tp", "pp-tp-dp", "tp-pp-dp"]


def _plan(tp: int, pp: int, dp: int, order: str, ep: int = 1) -> SimpleNamespace:
    layout = RankLayout(tp=tp, pp=pp, dp=dp, ep=ep, axis_order=tuple(order.split("-")), gpus_per_node=8)
    return SimpleNamespace(ranks=layout, tp=tp, pp=pp, dp=dp, ep=ep, world_size=tp * pp * dp)


@pytest.mark.parametrize(("shape", "order"), list(itertools.product(SHAPES, ORDERS)))
def test_topology_matches_plan(shape: tuple[int, int, int], order: str) -> None:
    tp, pp, dp = shape
    plan = _plan(tp, pp, dp, order)
    topo = process_topology(plan)
    check_topology(plan, topo)
    lists = topology_rank_lists(topo)
    for axis in ("tp", "pp", "dp"):
        assert lists[axis] == tuple(sorted(plan.ranks.groups(axis)))
    for rank in range(plan.world_size):
        c = plan.ranks.coords(rank)
        assert topo.get_rank(pipe=c["pp"], data=c["dp"], model=c["tp"]) == rank


def test_worked_example_golden_lists() -> None:
    """The worked example of plan/ranks.py (tp=2, pp=2, dp=2, pp-dp-tp) written out by hand."""
    topo = process_topology(_plan(2, 2, 2, "pp-dp-tp"))
    assert topo.get_axis_comm_lists("model") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert topo.get_axis_comm_lists("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert topo.get_axis_comm_lists("pipe") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_check_topology_detects_a_different_layout() -> None:
    plan = _plan(2, 2, 2, "pp-dp-tp")
    other = process_topology(_plan(2, 2, 2, "dp-pp-tp"))
    with pytest.raises(ValueError, match="rank 2: plan coordinates"):
        check_topology(plan, other)


@pytest.mark.parametrize(("tp", "dp", "ep", "order"), [(2, 2, 1, "pp-dp-tp"), (2, 4, 2, "pp-dp-tp"), (2, 4, 4, "pp-tp-dp"), (1, 8, 4, "pp-dp-tp")])
def test_mpu_ranks_and_sizes_match_plan(tp: int, dp: int, ep: int, order: str) -> None:
    plan = _plan(tp, 1, dp, order, ep=ep)
    for rank in range(plan.world_size):
        mpu = PlanMPU(plan, rank)
        c = plan.ranks.coords(rank)
        assert mpu.get_data_parallel_world_size() == dp and mpu.get_data_parallel_rank() == c["dp"]
        assert mpu.get_model_parallel_world_size() == tp and mpu.get_model_parallel_rank() == c["tp"]
        assert mpu.get_tensor_model_parallel_rank() == c["tp"]
        assert mpu.get_pipeline_model_parallel_world_size() == 1
        dp_ranks = mpu.get_data_parallel_group_ranks()
        assert tuple(dp_ranks) == plan.ranks.group("dp", rank) and dp_ranks[c["dp"]] == rank
        assert mpu.get_tensor_model_parallel_src_rank() == plan.ranks.group("tp", rank)[0]


def test_mpu_refuses_pipeline_plans() -> None:
    with pytest.raises(ValueError, match=r"parallel.pp=2"):
        PlanMPU(_plan(1, 2, 2, "pp-dp-tp"), 0)


def test_pipeline_parts_follow_the_plan(compose_cfg) -> None:
    """DeepSpeed's layer boundaries: embedding joins stage 0, norm + head close the last stage."""
    from hpframe.parallel.pipeline import plan_parts
    from hpframe.plan import make_plan

    cfg = compose_cfg("recipe=mixtral_debug", "parallel.pp=2", "parallel.dp=1")
    plan = make_plan(cfg, 2)
    sizes = [len(s.layers) for s in plan.pipeline.stages]
    assert plan_parts(plan) == [0, 1 + sizes[0], 2 + sizes[0] + sizes[1]]
    cfg = compose_cfg("recipe=mixtral_debug", "parallel.pp=4", "parallel.dp=1", "parallel.pipeline_layout=[1,1,1,1]")
    assert plan_parts(make_plan(cfg, 4)) == [0, 2, 3, 4, 6]


def test_pipeline_parts_reject_a_gap() -> None:
    from hpframe.parallel.pipeline import plan_parts
    from hpframe.plan.types import PipelinePlan, StagePlan

    stages = (StagePlan(0, (0, 1), True, False, 1.0), StagePlan(1, (3,), False, True, 1.0))
    with pytest.raises(ValueError, match=r"stage 1 blocks \(3,\) are not the next contiguous run after 2"):
        plan_parts(SimpleNamespace(pipeline=PipelinePlan(stages=stages, manual=True)))
