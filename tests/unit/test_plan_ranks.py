"""RankLayout rank lists against hand-written golden lists, and structural checks over ~20 shapes.

Golden lists follow docs/design.md: axis_order lists dense axes outermost first, rank = sum(coord *
stride) with the innermost axis at stride 1; ep_rank = dp_rank % ep, edp_rank = dp_rank // ep.
No processes.
"""

from __future__ import annotations

import itertools

import pytest

from hpframe.plan.errors import PlanError
from hpframe.plan.ranks import RankLayout, parse_axis_order


def layout(tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1, order: str = "pp-dp-tp", gpn: int = 8) -> RankLayout:
    return RankLayout(tp=tp, pp=pp, dp=dp, ep=ep, axis_order=parse_axis_order(order), gpus_per_node=gpn)


def test_tp2_pp2_dp2_default_order() -> None:
    r = layout(tp=2, pp=2, dp=2)
    assert r.groups("tp") == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert r.groups("dp") == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert r.groups("pp") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert r.groups("mp") == ((0, 1, 4, 5), (2, 3, 6, 7))
    assert r.groups("tp-dp") == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert r.groups("embedding") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert r.coords(5) == {"tp": 1, "pp": 1, "dp": 0, "ep": 0, "edp": 0}
    assert r.group("pp", 6) == (2, 6)


def test_tp2_pp2_dp2_order_tp_outermost() -> None:
    # order tp-pp-dp: strides tp=4, pp=2, dp=1
    r = layout(tp=2, pp=2, dp=2, order="tp-pp-dp")
    assert r.groups("dp") == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert r.groups("pp") == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert r.groups("tp") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert r.coords(6) == {"tp": 1, "pp": 1, "dp": 0, "ep": 0, "edp": 0}


def test_dp_outermost_order() -> None:
    # order dp-pp-tp with tp=2, pp=2, dp=2: strides dp=4, pp=2, tp=1
    r = layout(tp=2, pp=2, dp=2, order="dp-pp-tp")
    assert r.groups("pp") == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert r.groups("dp") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert r.groups("mp") == ((0, 1, 2, 3), (4, 5, 6, 7))


def test_ep2_inside_dp4() -> None:
    r = layout(dp=4, ep=2)
    assert r.groups("dp") == ((0, 1, 2, 3),)
    assert r.groups("ep") == ((0, 1), (2, 3))
    assert r.groups("edp") == ((0, 2), (1, 3))
    assert [r.coords(x)["ep"] for x in range(4)] == [0, 1, 0, 1]
    assert [r.coords(x)["edp"] for x in range(4)] == [0, 0, 1, 1]


def test_ep_with_tp_and_pp() -> None:
    # tp2 pp2 dp4 ep2, default order: dp stride 2, pp stride 8
    r = layout(tp=2, pp=2, dp=4, ep=2)
    assert r.group("ep", 0) == (0, 2)
    assert r.group("edp", 0) == (0, 4)
    assert r.group("ep", 13) == (13, 15)
    assert r.group("edp", 13) == (9, 13)
    assert r.group("dp", 13) == (9, 11, 13, 15)


def test_nodes_of_four() -> None:
    r = layout(tp=2, dp=4, gpn=4)
    assert [r.node_of(x) for x in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert r.nodes_of(r.group("dp", 0)) == (0, 1)
    assert r.nodes_of(r.group("tp", 6)) == (1,)


def test_embedding_groups_middle_stages_alone() -> None:
    r = layout(pp=4, dp=2)
    # strides pp=2, dp=1
    assert r.group("embedding", 0) == (0, 6)
    assert r.group("embedding", 7) == (1, 7)
    assert r.group("embedding", 3) == (3,)
    assert layout(dp=2).groups("embedding") == ((0,), (1,))


SHAPES = [
    (tp, pp, dp, ep, order)
    for (tp, pp, dp, ep), order in itertools.product(
        [(1, 1, 1, 1), (2, 1, 1, 1), (1, 2, 1, 1), (1, 1, 2, 2), (2, 2, 2, 1), (2, 2, 2, 2), (1, 4, 4, 2), (4, 2, 4, 4), (2, 3, 6, 3), (1, 2, 8, 4)],
        ["pp-dp-tp", "tp-dp-pp"],
    )
]


@pytest.mark.parametrize("tp,pp,dp,ep,order", SHAPES)
def test_groups_partition_the_world(tp: int, pp: int, dp: int, ep: int, order: str) -> None:
    r = layout(tp=tp, pp=pp, dp=dp, ep=ep, order=order, gpn=4)
    sizes = {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "edp": dp // ep, "mp": tp * pp}
    for axis in ("tp", "pp", "dp", "ep", "edp", "mp", "embedding", "tp-dp", "pp-ep"):
        gs = r.groups(axis)
        flat = sorted(x for g in gs for x in g)
        assert flat == list(range(r.world_size)), axis
        if axis in sizes:
            assert {len(g) for g in gs} == {sizes[axis]}, axis
        for g in gs:
            for x in g:
                assert r.group(axis, x) == g
    # every rank has distinct coordinates that rebuild it
    seen = set()
    for x in range(r.world_size):
        c = r.coords(x)
        assert c["dp"] == c["edp"] * ep + c["ep"]
        assert r.rank_of(tp=c["tp"], pp=c["pp"], dp=c["dp"]) == x
        seen.add((c["tp"], c["pp"], c["dp"]))
    assert len(seen) == r.world_size


@pytest.mark.parametrize("tp,pp,dp,ep,order", SHAPES)
def test_dense_and_expert_grids_share_pp_groups(tp: int, pp: int, dp: int, ep: int, order: str) -> None:
    r = layout(tp=tp, pp=pp, dp=dp, ep=ep, order=order)
    for g in r.groups("pp"):
        # along a pipeline group only the stage changes: tp, ep and edp coordinates are equal
        assert len({(r.coords(x)["tp"], r.coords(x)["ep"], r.coords(x)["edp"]) for x in g}) == 1
        assert [r.coords(x)["pp"] for x in g] == list(range(pp))
    # the expert grid (tp x ep x edp per stage) covers each stage exactly once
    for stage in range(pp):
        stage_ranks = {x for x in range(r.world_size) if r.coords(x)["pp"] == stage}
        expert_cells = {x for g in r.groups("ep") for x in g if r.coords(x)["pp"] == stage}
        assert stage_ranks == expert_cells


def test_bad_axis_order_and_axis() -> None:
    with pytest.raises(PlanError, match="parallel.axis_order='pp-tp'"):
        parse_axis_order("pp-tp")
    with pytest.raises(ValueError, match="unknown axis 'xx'"):
        layout(dp=2).group("xx", 0)
