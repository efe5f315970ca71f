"""Memory per GPU: weights, gradients, optimizer state and activations, for every pipeline stage.

Assumptions (stated in docs/planner.md):
* As hpframe/parallel/tensor.py shards them: attention (MLA: its up-projections and output), dense
  MLPs, embedding and head are split over the TP group; norms, MLA down-projections and the whole MoE
  MLP (router, shared experts) are replicated, and every TP rank runs the MoE on all its tokens.
  Routed experts are split over the EP group.
* bf16 training keeps bf16 weights and gradients plus an fp32 master copy and Adam m, v (12 bytes per
  parameter of optimizer state); fp32 training keeps fp32 weights and gradients and Adam m, v (8 bytes).
* bf16 also accumulates gradients in fp32 (DeepSpeed's grad_accum_dtype, as hpframe configures it):
  ZeRO-1 runs DeepSpeed's BF16_Optimizer, which holds a full fp32 copy of every local gradient
  (4 bytes per parameter, not sharded); ZeRO-2 holds the fp32 gradients of its partition only.
  Measured on one H200 (docs/performance.md, section 5): leaving this copy out under-estimated the
  peak by 13% (76.5 vs 88.1 GiB).
* ``train.master_dtype=bf16`` (ZeRO 1/2 only): DeepSpeed's ZeRO optimizer keeps a bf16 master
  partition and bf16 Adam m, v (6 bytes per parameter of optimizer state) and no gradient buffer of
  its own. Measured on one H200 (docs/performance.md, section 6): 54.7 GiB peak, 10 bytes per
  parameter plus activations; counting a separate 2-byte gradient partition over-estimated by 15%.
  Under ZeRO 0 it is the plain update of the bf16 weights: Adam m, v in bf16 only (4 bytes).
* ZeRO-1 shards optimizer state, ZeRO-2 also gradients, ZeRO-3 also weights: dense parameters over dp,
  expert parameters over edp (= dp / ep).
* Activations are per token and block, in the train dtype, with fused attention (no seq x seq scores
  kept). Under 1F1B stage s holds min(pp - s, grad_accum) micro-batches in flight.
* moe.dispatch=experts adds the fetched expert weights and their transient gradients
  (hpframe/plan/fetch.py, ``fetched_weight_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass

from hpframe.config.schema import Attention, DType, Recompute, RunConfig
from hpframe.plan.fetch import fetched_weight_bytes
from hpframe.plan.params import (attention_replicated_params, block_params, expert_ffn, head_dim, mlp_mats, num_kv_heads,
                                 padded_vocab)
from hpframe.plan.types import MemoryEstimate, ParallelPlan, StagePlan

GIB = 1 << 30


def dtype_bytes(cfg: RunConfig) -> int:
    return 2 if cfg.train.dtype == DType.bf16 else 4


@dataclass(frozen=True, slots=True)
class StageParams:
    """Parameters held by one rank of a stage: dense (sharded over dp by ZeRO) and expert (over edp)."""

    dense: int
    expert: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def stage_params(cfg: RunConfig, plan: ParallelPlan, stage: StagePlan) -> StageParams:
    """Parameters on one rank of ``stage`` before any ZeRO sharding."""
    m, moe, t = cfg.model, cfg.moe, plan.tp
    dense = expert = 0
    for i in stage.layers:
        b = block_params(m, moe, i)
        rep = attention_replicated_params(m)
        dense += (b.attention - rep + b.mlp) // t + rep + b.shared_experts + b.norms + b.router
        expert += b.experts // plan.ep
    vh = padded_vocab(m, t) * m.hidden_size // t
    if stage.has_embedding:
        dense += vh
    if stage.has_head:
        dense += m.hidden_size  # final norm
        # a tied head still needs its own copy of the embedding on the last stage when pp > 1
        if not m.tie_embeddings or plan.pp > 1:
            dense += vh
    return StageParams(dense, expert)


def block_activation_bytes(cfg: RunConfig, plan: ParallelPlan, i: int, *, recompute: Recompute) -> float:
    """Activation bytes per token kept for backward by block ``i`` on one rank (before recompute=full)."""
    m, moe, t, e = cfg.model, cfg.moe, plan.tp, dtype_bytes(cfg)
    h = m.hidden_size
    sp = t if cfg.parallel.sequence_parallel else 1
    res = 2 * h / sp  # norm input and norm output (sequence-sharded under sequence parallelism)
    if m.attention == Attention.mla:
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        latent = 2 * m.q_lora_rank + 2 * m.kv_lora_rank + m.qk_rope_head_dim
        core = m.num_heads * (qk + qk + m.v_head_dim) / t  # q, k, v into the attention core
        out = m.num_heads * m.v_head_dim / t
        attn = res + latent + core + out
    else:
        hd, nkv = head_dim(m), num_kv_heads(m)
        attn = res + (m.num_heads + 2 * nkv) * hd / t + m.num_heads * hd / t
    b = block_params(m, moe, i)
    mats = mlp_mats(m)
    if b.is_moe:
        # replicated over TP: the full token stream (gathered under sequence parallelism)
        fe, k = expert_ffn(m, moe), moe.top_k
        inner = k * mats * fe  # expert hidden activations of the k copies
        if recompute == Recompute.selective:
            inner = 0.0
        mlp = 2 * h + 2 * k * h + inner + moe.num_shared_experts * mats * fe + 4 * moe.num_experts / e
    else:
        mlp = res + mats * m.ffn_hidden_size / t
    return e * (attn + mlp)


def stage_activation_bytes(cfg: RunConfig, plan: ParallelPlan, stage: StagePlan) -> int:
    """Activation bytes on one rank of ``stage`` with its micro-batches in flight."""
    p, m = cfg.parallel, cfg.model
    tokens = plan.micro_batch_size * plan.seq_len
    in_flight = min(plan.pp - stage.index, plan.grad_accum)
    e = dtype_bytes(cfg)
    per_block = [block_activation_bytes(cfg, plan, i, recompute=p.recompute) for i in stage.layers]
    if p.recompute == Recompute.full:
        sp = plan.tp if p.sequence_parallel else 1
        kept = len(stage.layers) * e * m.hidden_size / sp  # block inputs only
        working = max(per_block)  # one block re-run at a time, for one micro-batch
        total = tokens * (in_flight * kept + working)
    else:
        total = tokens * in_flight * sum(per_block)
    if stage.has_head:
        # logits and their fp32 softmax for the loss; under train.compile (tp = pp = 1) the loss is one
        # compiled kernel that upcasts on the fly: the logits only (measured on one H200: -4.7 GiB)
        fused_loss = cfg.train.compile and plan.tp == 1 and plan.pp == 1
        total += tokens * padded_vocab(m, plan.tp) / plan.tp * (e if fused_loss else e + 4)
    return int(total)


def load_host_peak(cfg: RunConfig, plan: ParallelPlan, params_on_rank: int) -> int:
    """model.from_hf: bytes of host memory one rank adds while it streams the checkpoint (0 without from_hf).

    The rank's parameters in fp32 plus the largest slice read at once: its share of the embedding or head
    (padded vocabulary / tp rows), one expert matrix, or its share of a dense MLP matrix; the full
    model never is (measured: bench/results/2026-12-06_cpu_hf_stream)."""
    if not cfg.model.from_hf:
        return 0
    m, t = cfg.model, plan.tp
    largest = max(padded_vocab(m, t) // t, expert_ffn(m, cfg.moe), m.ffn_hidden_size // t) * m.hidden_size
    return 4 * (params_on_rank + largest)


def estimate_memory(cfg: RunConfig, plan: ParallelPlan) -> MemoryEstimate:
    """Memory of every stage; the worst stage's parts are reported."""
    w = g = dtype_bytes(cfg)
    bf16 = cfg.train.dtype == DType.bf16
    bf16_master = bf16 and cfg.train.master_dtype == DType.bf16
    z = plan.zero_stage
    opt = (4 if z == 0 else 6) if bf16_master else 12 if bf16 else 8  # ZeRO 0 bf16: m, v only
    dp, edp = plan.dp, plan.edp
    fetch = plan.experts is not None and plan.experts.dispatch == "experts"
    rows = []
    for st in plan.pipeline.stages:
        sp = stage_params(cfg, plan, st)
        dense_w = sp.dense / dp if z >= 3 else sp.dense
        dense_g = sp.dense / dp if z >= 2 else sp.dense
        dense_o = sp.dense / dp if z >= 1 else sp.dense
        exp_w = sp.expert / edp if z >= 3 else sp.expert
        exp_g = sp.expert / edp if z >= 2 else sp.expert
        exp_o = sp.expert / edp if z >= 1 else sp.expert
        accum = 0.0  # the optimizer's own gradient buffers (see the module docstring)
        if bf16 and not bf16_master:
            accum = 4 * (sp.dense / dp + sp.expert / edp if z >= 2 else sp.dense + sp.expert)
        parts = (
            int(w * (dense_w + exp_w)),
            int(g * (dense_g + exp_g) + accum),
            int(opt * (dense_o + exp_o)),
            stage_activation_bytes(cfg, plan, st),
            fetched_weight_bytes(cfg, plan, st) if fetch else 0,
        )
        rows.append((st.index, parts, sp.total))
    worst = max(rows, key=lambda r: sum(r[1]))
    return MemoryEstimate(
        stage=worst[0],
        weights=worst[1][0],
        gradients=worst[1][1],
        optimizer=worst[1][2],
        activations=worst[1][3],
        params_on_rank=worst[2],
        per_stage_total=tuple(sum(r[1]) for r in rows),
        device_bytes=int(cfg.cluster.gpu_memory_gb * GIB),
        fetched_experts=worst[1][4],
        load_host_peak=max(load_host_peak(cfg, plan, r[2]) for r in rows),
    )
