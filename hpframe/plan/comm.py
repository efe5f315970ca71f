"""Bytes one GPU sends per optimizer step, by collective, split into intra-node and inter-node traffic.

Model (per rank of the busiest pipeline stage; T = micro_batch_size * seq_len tokens per micro-batch,
e = bytes of the train dtype, ga = grad_accum micro-batches per step):
* MoE all-to-all: per MoE block and micro-batch a rank dispatches T tokens (the MoE is replicated
  over TP, so every TP rank routes the whole stream) x top_k copies of H
  values and receives them back combined; dispatch + combine forward and the same backward = 4
  exchanges (6 with full recompute). Routing is taken as uniform, so a copy stays on the rank with
  probability 1/ep, goes to a rank of the same node with (k-1)/ep and to another node with (ep-k)/ep,
  k = EP ranks per node. Under node-limited routing to M nodes (n nodes per EP group) a token crosses
  to at most M*(n-1)/n other nodes once each and is forwarded inside the node from there.
* Moving experts instead (moe.dispatch=experts): the hierarchical fetch of the experts' weights and
  return of their gradients, per MoE layer and micro-batch (hpframe/plan/fetch.py). Only the chosen
  mode's bytes count in the parts and the total; ``moe_move_experts`` always holds the fetch's.
* TP: per block and micro-batch, attention costs 2 all-reduces of T*H values (forward, backward),
  a dense MLP 2 more, an MoE MLP none (1 all-reduce equivalent under sequence parallelism: gather
  forward, gather backward); x1.5 under full recompute. A ring all-reduce sends 2(t-1)/t of the data
  (as all-gather + reduce-scatter under sequence parallelism). Embedding and head are left out.
* DP: ZeRO-0 ring all-reduce of the gradients (2(d-1)/d); ZeRO-1 reduce-scatter of the gradients and
  all-gather of the updated weights ((d-1)/d each); ZeRO-2 reduce-scatters every micro-batch; ZeRO-3
  also gathers weights in forward and backward of every micro-batch. Dense over dp, experts over edp.
* PP: each micro-batch's activations forward (not from the last stage) and their gradients backward
  (not from the first stage), T*H values each.
A group that spans several nodes counts as inter-node: the ring runs at the slowest link.
All-to-all calls are counted too (``estimate_time`` charges each a fixed latency).
"""

from __future__ import annotations

from hpframe.config.schema import Recompute, RunConfig
from hpframe.plan.fetch import fetch_bytes, fetch_calls
from hpframe.plan.memory import dtype_bytes, stage_params
from hpframe.plan.params import block_params
from hpframe.plan.types import CommEstimate, ParallelPlan, StagePlan


def _split(nbytes: float, inter: bool) -> dict[str, int]:
    return {"intra": 0, "inter": int(nbytes)} if inter else {"intra": int(nbytes), "inter": 0}


def _spans_nodes(plan: ParallelPlan, axis: str, rank: int) -> bool:
    return len(plan.ranks.nodes_of(plan.ranks.group(axis, rank))) > 1


def _first_rank_of_stage(plan: ParallelPlan, stage: int) -> int:
    return plan.ranks.rank_of(tp=0, pp=stage, dp=0)


def moe_all_to_all(cfg: RunConfig, plan: ParallelPlan, stage: StagePlan) -> dict[str, int]:
    """All-to-all bytes of one rank of ``stage`` per step."""
    ex = plan.experts
    n_moe = sum(1 for i in stage.layers if i in plan.moe_layers)
    if ex is None or n_moe == 0 or plan.ep == 1:
        return {"intra": 0, "inter": 0}
    moe, h, e = cfg.moe, cfg.model.hidden_size, dtype_bytes(cfg)
    ep, k = plan.ep, ex.ranks_per_node_in_ep_group
    nodes = ep // k if k else 1
    inter_copies = moe.top_k * (ep - k) / ep
    if moe.max_nodes_per_token > 0 and nodes > 1:
        inter_copies = min(inter_copies, moe.max_nodes_per_token * (nodes - 1) / nodes)
    intra_copies = moe.top_k * (ep - 1) / ep - inter_copies
    exchanges = 6 if cfg.parallel.recompute == Recompute.full else 4
    per_copy = plan.micro_batch_size * plan.seq_len * h * e * exchanges * plan.grad_accum * n_moe
    return {"intra": int(per_copy * intra_copies), "inter": int(per_copy * inter_copies)}


def moe_all_to_all_calls(cfg: RunConfig, plan: ParallelPlan, stage: StagePlan) -> int:
    """All-to-all calls of one rank of ``stage`` per step: per MoE layer and micro-batch, the row
    exchanges (4, 6 with full recompute) and the forward's exchange of the split sizes."""
    n_moe = sum(1 for i in stage.layers if i in plan.moe_layers)
    if plan.experts is None or n_moe == 0 or plan.ep == 1:
        return 0
    exchanges = 6 if cfg.parallel.recompute == Recompute.full else 4
    return (exchanges + 1) * n_moe * plan.grad_accum


def move_experts(cfg: RunConfig, plan: ParallelPlan, stage: StagePlan) -> dict[str, int]:
    """The alternative to all-to-all: bytes to bring the experts' weights to the tokens and their
    gradients back (hierarchical: once per node across the network, shared inside it)."""
    return fetch_bytes(cfg, plan, stage)


def tensor_parallel(cfg: RunConfig, plan: ParallelPlan, stage: StagePlan) -> dict[str, int]:
    t = plan.tp
    if t == 1:
        return {"intra": 0, "inter": 0}
    moe_ops = 1 if cfg.parallel.sequence_parallel else 0
    ops = sum(2 + (moe_ops if i in plan.moe_layers else 2) for i in stage.layers)
    if cfg.parallel.recompute == Recompute.full:
        ops *= 1.5
    size = plan.micro_batch_size * plan.seq_len * cfg.model.hidden_size * dtype_bytes(cfg)
    nbytes = ops * 2 * (t - 1) / t * size * plan.grad_accum
    return _split(nbytes, _spans_nodes(plan, "tp", _first_rank_of_stage(plan, stage.index)))


def data_parallel(cfg: RunConfig, plan: ParallelPlan, stage: StagePlan) -> dict[str, int]:
    sp, e, ga = stage_params(cfg, plan, stage), dtype_bytes(cfg), plan.grad_accum
    rank = _first_rank_of_stage(plan, stage.index)
    out = {"intra": 0, "inter": 0}
    for n, d, axis in ((sp.dense, plan.dp, "dp"), (sp.expert, plan.edp, "edp")):
        if d == 1 or n == 0:
            continue
        frac, size = (d - 1) / d, n * e
        nbytes = {0: 2 * frac * size, 1: 2 * frac * size, 2: frac * size * (ga + 1), 3: frac * size * 3 * ga}[plan.zero_stage]
        part = _split(nbytes, _spans_nodes(plan, axis, rank))
        out["intra"] += part["intra"]
        out["inter"] += part["inter"]
    return out


def pipeline_parallel(cfg: RunConfig, plan: ParallelPlan, stage: StagePlan) -> dict[str, int]:
    if plan.pp == 1:
        return {"intra": 0, "inter": 0}
    size = plan.micro_batch_size * plan.seq_len * cfg.model.hidden_size * dtype_bytes(cfg) * plan.grad_accum
    rank = _first_rank_of_stage(plan, stage.index)
    out = {"intra": 0, "inter": 0}
    for neighbour in (stage.index + 1, stage.index - 1):  # activations forward, gradients backward
        if 0 <= neighbour < plan.pp:
            other = _first_rank_of_stage(plan, neighbour)
            key = "intra" if plan.ranks.node_of(rank) == plan.ranks.node_of(other) else "inter"
            out[key] += size
    return out


def estimate_comm(cfg: RunConfig, plan: ParallelPlan) -> CommEstimate:
    """Per-step bytes of the stage that sends the most."""
    best: CommEstimate | None = None
    fetch = plan.experts is not None and plan.experts.dispatch == "experts"
    none = {"intra": 0, "inter": 0}
    for st in plan.pipeline.stages:
        moved = move_experts(cfg, plan, st)
        est = CommEstimate(
            parts={
                "moe_all_to_all": none if fetch else moe_all_to_all(cfg, plan, st),
                "moe_fetch_experts": moved if fetch else none,
                "tp": tensor_parallel(cfg, plan, st),
                "dp": data_parallel(cfg, plan, st),
                "pp": pipeline_parallel(cfg, plan, st),
            },
            moe_move_experts=moved,
            stage=st.index,
            all_to_all_calls=0 if fetch else moe_all_to_all_calls(cfg, plan, st),
            fetch_calls=fetch_calls(cfg, plan, st) if fetch else 0,
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best
