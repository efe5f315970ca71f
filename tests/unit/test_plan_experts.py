"""Expert placement and node groups for node-limited routing, derived from the real node layout.
Expected placements are worked out by hand from docs/design.md. No processes."""

from __future__ import annotations

from hpframe.plan import make_plan


def test_deepseek_v3_ep_group_spans_eight_nodes(compose_cfg) -> None:
    plan = make_plan(compose_cfg("recipe=deepseek_v3"))  # 256 nodes x 8, tp1 pp16 dp128 ep64
    ex = plan.experts
    assert ex is not None
    assert (ex.num_experts, ex.ep, ex.experts_per_rank) == (256, 64, 4)
    assert (ex.routing_groups, ex.max_groups_per_token, ex.ranks_per_node_in_ep_group) == (8, 4, 8)
    # EP group of rank 0: dp coordinates 0..63 at stride 1 (tp=1 innermost) = ranks 0..63 = nodes 0..7
    placement = ex.placement(plan.ranks, 0)
    assert placement[0] == (0, 0) and placement[255] == (63, 7)
    # each node's experts form one routing group
    for e in range(256):
        rank, node = placement[e]
        assert ex.routing_group_of(e) == node == rank // 8
    assert list(ex.local_experts(5)) == [20, 21, 22, 23]
    # second EP group of stage 0 starts at dp coordinate 64 = rank 64 (node 8)
    assert ex.placement(plan.ranks, 64)[0] == (64, 8)
    assert not any("routing" in w for w in plan.warnings)


def test_routing_groups_follow_nodes_and_warn(compose_cfg) -> None:
    # 8 nodes of 1 GPU, ep=8: the EP group spans 8 nodes, so 8 routing groups instead of moe.num_expert_groups=4
    plan = make_plan(compose_cfg("recipe=deepseek_debug", "cluster=h200x8", "cluster.nodes=8", "cluster.gpus_per_node=1", "parallel.ep=8"))
    ex = plan.experts
    assert (ex.routing_groups, ex.experts_per_rank) == (8, 2)
    assert [ex.routing_group_of(e) for e in range(16)] == [e // 2 for e in range(16)]
    assert [node for _, node in ex.placement(plan.ranks, 0)] == [e // 2 for e in range(16)]
    assert any("uses 8 groups" in w and "moe.num_expert_groups=4" in w for w in plan.warnings)


def test_single_node_uses_configured_groups(compose_cfg) -> None:
    plan = make_plan(compose_cfg("recipe=deepseek_debug", "parallel=dp2_ep2"))
    ex = plan.experts
    assert (ex.routing_groups, ex.max_groups_per_token, ex.experts_per_rank) == (4, 2, 8)
    assert [ex.ep_rank_of(e) for e in (0, 7, 8, 15)] == [0, 0, 1, 1]
    assert plan.moe_layers == (1, 2, 3)


def test_ep_with_tp_strides_over_tp(compose_cfg) -> None:
    # tp2 pp2 dp2 ep2 on the cpu cluster (one node of 8): EP group of rank 0 is dp coords 0, 1 = ranks 0, 2
    plan = make_plan(compose_cfg("recipe=mixtral_debug", "parallel=tp2_pp2_dp2"))
    assert plan.ranks.group("ep", 0) == (0, 2)
    assert [r for r, _ in plan.experts.placement(plan.ranks, 1)] == [1] * 4 + [3] * 4


def test_dense_model_has_no_expert_plan(compose_cfg) -> None:
    plan = make_plan(compose_cfg("recipe=gpt_debug"))
    assert plan.experts is None and plan.moe_layers == ()
