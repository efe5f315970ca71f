"""Degree, world-size and batch resolution of the planner against values worked out by hand. No processes."""

from __future__ import annotations

from hpframe.plan import make_plan


def test_dp_derived_from_cluster(compose_cfg) -> None:
    plan = make_plan(compose_cfg("recipe=mixtral_8x7b"))  # h200x64: 8 nodes x 8; tp2 pp2 ep8
    assert (plan.world_size, plan.tp, plan.pp, plan.dp, plan.ep, plan.edp) == (64, 2, 2, 16, 8, 2)
    assert (plan.num_nodes, plan.gpus_per_node) == (8, 8)
    # global 1024 = micro 1 * dp 16 * grad_accum 64
    assert (plan.micro_batch_size, plan.grad_accum, plan.global_batch_size) == (1, 64, 1024)


def test_cpu_cluster_world_is_product_of_degrees(compose_cfg) -> None:
    plan = make_plan(compose_cfg("recipe=mixtral_debug", "parallel=tp2_pp2_dp2"))
    assert (plan.world_size, plan.tp, plan.pp, plan.dp, plan.ep) == (8, 2, 2, 2, 2)
    assert plan.gpus_per_node == 8 and plan.num_nodes == 1
    single = make_plan(compose_cfg("recipe=mixtral_debug"))
    assert (single.world_size, single.dp) == (1, 1)


def test_cpu_cluster_nodes_split_world(compose_cfg) -> None:
    plan = make_plan(compose_cfg("recipe=mixtral_debug", "parallel.dp=4", "cluster.nodes=2"))
    assert plan.gpus_per_node == 2
    assert [plan.ranks.node_of(r) for r in range(4)] == [0, 0, 1, 1]


def test_explicit_world_size(compose_cfg) -> None:
    plan = make_plan(compose_cfg("recipe=gpt_debug", "parallel.tp=2"), world_size=8)
    assert (plan.world_size, plan.dp) == (8, 4)


def test_batch_derivation(compose_cfg) -> None:
    # neither given: grad_accum = pp, global = micro * dp * pp
    p = make_plan(compose_cfg("recipe=gpt_debug", "parallel.pp=2", "parallel.dp=2"))
    assert (p.grad_accum, p.global_batch_size) == (2, 8 * 2 * 2)
    # global given: grad_accum = 64 / (8 * 2)
    p = make_plan(compose_cfg("recipe=gpt_debug", "parallel.dp=2", "parallel.global_batch_size=64"))
    assert (p.grad_accum, p.global_batch_size) == (4, 64)
    # grad_accum given: global = 8 * 2 * 3
    p = make_plan(compose_cfg("recipe=gpt_debug", "parallel.dp=2", "parallel.grad_accum=3"))
    assert (p.grad_accum, p.global_batch_size) == (3, 48)
    # both given and consistent
    p = make_plan(compose_cfg("recipe=gpt_debug", "parallel.dp=2", "parallel.grad_accum=3", "parallel.global_batch_size=48"))
    assert (p.grad_accum, p.global_batch_size) == (3, 48)
