"""Cost of moving experts instead of tokens (``moe.dispatch=experts``): bytes, collective calls, memory.

The data-centric path (hpframe/parallel/expert_fetch.py) keeps every token on its rank and brings
the routed experts' weights to it. One EP group of ``ep`` ranks spans ``n`` nodes with ``k = ep / n``
ranks on each; EP rank r owns the contiguous expert block r, of S bytes per MoE layer
(S = E/ep experts x their parameters x the train dtype's bytes). Per MoE layer and micro-batch:

* forward, fetch (hierarchical all-gather): first across nodes, among the n ranks of the group with
  the same position j inside their node -- each remote block crosses the network ONCE per node,
  carried by the one rank of the node that has its position -- then inside the node, among its k
  ranks, which share what each fetched. Per rank: (n-1)*S bytes sent inter-node, (k-1)*n*S
  intra-node. When the group fits one node (n = 1) this is one all-gather of (ep-1)*S intra-node.
* backward, return of the gradients (hierarchical reduce-scatter, the fetch reversed): reduced inside
  the node first, so each block's node-sum crosses the network once, then across nodes to the owner.
  Same bytes as the fetch. Owners then hold the sum over the EP group's tokens: exactly the
  gradient token dispatch leaves on them.
* full recompute runs each block's forward again in backward, and with it the fetch.

Worked example: ep=8 over n=2 nodes (k=4), one Mixtral-8x7B expert per rank (3 x 4096 x 14336 =
176 M parameters, S = 352 MB in bf16). Per layer and micro-batch the fetch sends (2-1) x 352 MB =
352 MB across nodes and (4-1) x 2 x 352 MB = 2.1 GB inside the node, and the gradient return the same,
whatever the tokens. Token dispatch of 4096 tokens x top-2 x 4096 x 2 B = 67 MB per exchange sends
4 exchanges x 67 MB x 4/8 = 134 MB across nodes: tokens win here. Experts win when a layer's experts
are small next to the routed tokens (fine-grained experts, long micro-batches, large top-k): see the
table of docs/planner.md, made by bench/dispatch_bench.py.

Memory: the fetched full weights [E, ...] of a layer (ep*S bytes) stay alive until its backward
(autograd keeps them for the input and weight gradients), for every MoE layer of the stage and every
micro-batch in flight; full recompute keeps only the block being recomputed plus the next one being
fetched. In backward the full-size gradient of one layer is transient (twice when the hierarchical
reduce-scatter needs it regrouped by node position).
"""

from __future__ import annotations

from hpframe.config.schema import DType, Recompute, RunConfig
from hpframe.plan.params import block_params
from hpframe.plan.types import ParallelPlan, StagePlan


def _dtype_bytes(cfg: RunConfig) -> int:
    return 2 if cfg.train.dtype == DType.bf16 else 4


def ep_nodes(plan: ParallelPlan) -> tuple[int, int]:
    """(n nodes one EP group spans, k EP ranks per node); k = 0 when the group splits unevenly."""
    ex = plan.experts
    assert ex is not None
    k = ex.ranks_per_node_in_ep_group
    return (plan.ep // k if k else 0), k


def _moe_layers(plan: ParallelPlan, stage: StagePlan) -> list[int]:
    return [i for i in stage.layers if i in plan.moe_layers]


def shard_bytes(cfg: RunConfig, plan: ParallelPlan, layer: int) -> int:
    """S: bytes of one EP rank's expert block of MoE layer ``layer`` in the train dtype."""
    return block_params(cfg.model, cfg.moe, layer).experts // plan.ep * _dtype_bytes(cfg)


def fetches_per_micro_batch(cfg: RunConfig) -> int:
    """All-gathers per MoE layer and micro-batch: 1, 2 under full recompute (the forward runs twice)."""
    return 2 if cfg.parallel.recompute == Recompute.full else 1


def fetch_bytes(cfg: RunConfig, plan: ParallelPlan, stage: StagePlan) -> dict[str, int]:
    """Bytes one rank of ``stage`` sends per step under moe.dispatch=experts (fetches + gradient returns)."""
    layers = _moe_layers(plan, stage)
    if plan.experts is None or not layers or plan.ep == 1:
        return {"intra": 0, "inter": 0}
    n, k = ep_nodes(plan)
    if k == 0:  # uneven groups cannot fetch hierarchically (refused); count a flat all-gather as inter-node
        n, k = plan.ep, 1
    ops = (fetches_per_micro_batch(cfg) + 1) * plan.grad_accum  # all-gathers + one reduce-scatter
    s = sum(shard_bytes(cfg, plan, i) for i in layers)
    return {"intra": ops * (k - 1) * n * s, "inter": ops * (n - 1) * s}


def fetch_calls(cfg: RunConfig, plan: ParallelPlan, stage: StagePlan) -> int:
    """Collective calls of one rank of ``stage`` per step: one per level (intra, inter) and operation."""
    layers = _moe_layers(plan, stage)
    if plan.experts is None or not layers or plan.ep == 1:
        return 0
    n, k = ep_nodes(plan)
    levels = (1 if n > 1 else 0) + (1 if k > 1 else 0)
    return levels * (fetches_per_micro_batch(cfg) + 1) * plan.grad_accum * len(layers)


def fetched_weight_bytes(cfg: RunConfig, plan: ParallelPlan, stage: StagePlan) -> int:
    """Peak bytes of fetched expert weights and their full-size gradients on one rank of ``stage``."""
    layers = _moe_layers(plan, stage)
    if plan.experts is None or not layers or plan.ep == 1:
        return 0
    full = [shard_bytes(cfg, plan, i) * plan.ep for i in layers]  # one layer's gathered [E, ...] weights
    biggest = max(full)
    if cfg.parallel.recompute == Recompute.full:
        weights = 2 * biggest  # the block being recomputed and the next one's prefetch
    else:
        in_flight = min(plan.pp - stage.index, plan.grad_accum)
        weights = in_flight * sum(full)
    n, k = ep_nodes(plan)
    grads = biggest * (2 if n > 1 and k > 1 else 1)
    return weights + grads


def expected_selected_fraction(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected fraction of the experts that at least one of ``tokens`` tokens selects, under uniform
    top-k routing: 1 - (1 - k/E)^tokens. Near 1 at realistic batch sizes, which is why the runtime
    fetches all of a layer's experts instead of only the selected ones (no data-dependent exchange)."""
    return 1.0 - (1.0 - top_k / num_experts) ** tokens
