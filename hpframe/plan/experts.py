"""Expert placement and the node groups of node-limited routing.

Experts are cut into ``ep`` contiguous slices; EP rank r holds experts [r*E/ep, (r+1)*E/ep). An EP
group is ``ep`` neighbouring dp coordinates, so when it spans several nodes each node holds a
contiguous block of experts, and the routing groups follow the nodes: with an EP group over 8 nodes
and moe.max_nodes_per_token = 4, experts form 8 groups and each token reaches at most 4 of them.
Inside one node, moe.num_expert_groups (DeepSeek's device-limited grouping) is used instead.
"""

from __future__ import annotations

from hpframe.config.schema import MoEConfig
from hpframe.plan.errors import PlanError
from hpframe.plan.ranks import RankLayout
from hpframe.plan.types import ExpertPlan


def ep_group_node_shape(ranks: RankLayout) -> tuple[int, int]:
    """(nodes spanned by one EP group, EP ranks per node); (n, 0) when groups split unevenly over nodes."""
    shapes = set()
    for g in ranks.groups("ep"):
        counts: dict[int, int] = {}
        for r in g:
            counts[ranks.node_of(r)] = counts.get(ranks.node_of(r), 0) + 1
        per_node = set(counts.values())
        shapes.add((len(counts), per_node.pop() if len(per_node) == 1 else 0))
        if len(shapes) > 1:
            break
    if len(shapes) == 1:
        return shapes.pop()
    return max(n for n, _ in shapes), 0


def make_expert_plan(moe: MoEConfig, ranks: RankLayout, warnings: list[str]) -> ExpertPlan | None:
    """ExpertPlan for an MoE model (None when moe.num_experts == 0)."""
    e, ep = moe.num_experts, ranks.ep
    if e == 0:
        return None
    if e % ep:
        raise PlanError(
            f"moe.num_experts={e} cannot be split over parallel.ep={ep} ranks ({e} % {ep} = {e % ep})",
            key="moe.num_experts, parallel.ep",
            values={"moe.num_experts": e, "parallel.ep": ep},
        )
    if moe.num_expert_groups < 1 or e % moe.num_expert_groups:
        raise PlanError(
            f"moe.num_expert_groups={moe.num_expert_groups} must be >= 1 and divide moe.num_experts={e}",
            key="moe.num_expert_groups, moe.num_experts",
            values={"moe.num_expert_groups": moe.num_expert_groups, "moe.num_experts": e},
        )
    nodes, per_node = ep_group_node_shape(ranks)
    if nodes > 1:
        if per_node == 0 or e % nodes:
            msg = (
                f"one EP group (parallel.ep={ep}) spans {nodes} nodes unevenly (cluster.gpus_per_node={ranks.gpus_per_node},"
                f" parallel.axis_order={'-'.join(ranks.axis_order)}) or moe.num_experts={e} does not split over them"
            )
            if moe.max_nodes_per_token > 0:
                raise PlanError(msg + "; node-limited routing needs equal expert blocks per node",
                                key="moe.max_nodes_per_token, parallel.ep",
                                values={"moe.max_nodes_per_token": moe.max_nodes_per_token, "parallel.ep": ep, "nodes": nodes})
            warnings.append(msg + f"; routing groups fall back to moe.num_expert_groups={moe.num_expert_groups}")
            groups = moe.num_expert_groups
        else:
            groups = nodes
            if groups != moe.num_expert_groups and moe.max_nodes_per_token > 0:
                warnings.append(
                    f"node-limited routing uses {groups} groups (the nodes one EP group of parallel.ep={ep} spans),"
                    f" not moe.num_expert_groups={moe.num_expert_groups}"
                )
    else:
        groups = moe.num_expert_groups
    m = moe.max_nodes_per_token
    if m == 0 and moe.num_expert_groups > 1:
        warnings.append(f"moe.num_expert_groups={moe.num_expert_groups} has no effect with moe.max_nodes_per_token=0")
    if m > groups:
        raise PlanError(
            f"moe.max_nodes_per_token={m} exceeds the {groups} routing groups (one EP group of parallel.ep={ep} spans {nodes} node(s))",
            key="moe.max_nodes_per_token",
            values={"moe.max_nodes_per_token": m, "routing_groups": groups, "parallel.ep": ep},
        )
    if m > 0 and moe.top_k > m * (e // groups):
        raise PlanError(
            f"moe.top_k={moe.top_k} exceeds the {m * (e // groups)} experts reachable under node-limited routing"
            f" (moe.max_nodes_per_token={m} groups x {e // groups} experts each)",
            key="moe.top_k, moe.max_nodes_per_token",
            values={"moe.top_k": moe.top_k, "moe.max_nodes_per_token": m, "reachable_experts": m * (e // groups)},
        )
    if m > 0 and m == groups:
        warnings.append(f"moe.max_nodes_per_token={m} equals the number of routing groups: node-limited routing has no effect")
    return ExpertPlan(
        num_experts=e,
        ep=ep,
        experts_per_rank=e // ep,
        routing_groups=groups,
        max_groups_per_token=m,
        ranks_per_node_in_ep_group=per_node if nodes > 1 else ep,
    )
