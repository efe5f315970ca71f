"""Mixture-of-Experts layer: router, capacity/dropping, token permutation, grouped experts, losses.

Single-device code. Shape legend: T tokens in this call (B*S), H hidden, E routed experts, k top_k,
Fe expert inner size, N kept (token, expert) assignments, G routing groups.

Data flow of ``MoE.forward`` (each arrow is one function below, tested on its own):
  x[T,H] -> Router -> Routing(topk_idx[T,k], topk_weight[T,k], ...)
         -> dispatch_order -> order[N] (assignment ids a = t*k + j, grouped by expert id ascending,
                                         tokens over capacity left out), counts[E]
         -> x_sorted = x[order // k] -> self.experts(x_sorted, counts) -> y_sorted[N,H]
         -> y[T,H] = sum over kept assignments of weight * y_sorted (index_add, the exact inverse)
         -> + shared(x)
``experts`` is THE seam the expert-parallel wrapper replaces (same call signature, global ids).
Routing math runs in fp32 (or float64 for float64 inputs) whatever the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hpframe.config.schema import Activation, DropPolicy, MoEConfig, ScoreFunc
from hpframe.models import moe_gpu
from hpframe.models.layers import MLP


@dataclass
class Routing:
    """Router output for T tokens."""

    logits: torch.Tensor  # [T,E] fp32, before noise
    scores: torch.Tensor  # [T,E] fp32 affinities: softmax probabilities or per-expert sigmoid
    topk_idx: torch.Tensor  # [T,k] int64 global expert ids
    topk_score: torch.Tensor  # [T,k] fp32 scores of the chosen experts (drop priority)
    topk_weight: torch.Tensor  # [T,k] fp32 combine weights (normalized if asked, times route_scale)


def group_limited_mask(choice: torch.Tensor, num_groups: int, max_groups: int) -> torch.Tensor:
    """Bool mask [T,E]: the experts inside each token's best ``max_groups`` of ``num_groups`` groups.

    Groups are contiguous blocks of E/G experts; a group's affinity is the sum of the token's top-2
    choice scores inside it (top-1 when a group holds one expert), as in DeepSeek-V3.
    """
    t, e = choice.shape
    per_group = e // num_groups
    grouped = choice.view(t, num_groups, per_group)
    group_score = grouped.topk(min(2, per_group), dim=-1).values.sum(-1)  # [T,G]
    best = group_score.topk(max_groups, dim=-1).indices  # [T,M]
    gmask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
    return gmask[:, :, None].expand(t, num_groups, per_group).reshape(t, e)


def capacity_of(num_tokens: int, num_experts: int, top_k: int, factor: float, min_capacity: int) -> int:
    """Tokens one expert may take: max(ceil(T/E * k * factor), min_capacity)."""
    return max(math.ceil(num_tokens / num_experts * top_k * factor), min_capacity)


def dispatch_order(
    topk_idx: torch.Tensor,
    topk_score: torch.Tensor,
    num_experts: int,
    capacity: int | None,
    policy: DropPolicy = DropPolicy.probs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order of the kept assignments, grouped by expert id ascending.

    Returns (order[N] int64 assignment ids a = t*k + j, kept counts[E] int64, routed counts[E] int64).
    capacity=None keeps everything (dropless; tokens of one expert stay in position order).
    Otherwise each expert keeps at most ``capacity`` assignments: those with the highest router score
    (policy=probs; ties by position) or the earliest tokens (policy=position; a token's own k
    assignments go to k different experts, so they never compete).
    """
    flat_e = topk_idx.reshape(-1)  # [T*k]
    routed = torch.bincount(flat_e, minlength=num_experts)
    if capacity is None:
        return torch.argsort(flat_e, stable=True), routed, routed
    if DropPolicy(policy) == DropPolicy.probs:
        prio = torch.argsort(-topk_score.reshape(-1), stable=True)  # best score first
    else:
        prio = torch.arange(flat_e.numel(), device=flat_e.device)  # token-major: earliest first
    order = prio[torch.argsort(flat_e[prio], stable=True)]  # by expert, priority order inside
    starts = torch.cumsum(routed, 0) - routed
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
    order = order[rank_in_expert < capacity]
    return order, routed.clamp(max=capacity), routed


def switch_aux_loss(scores: torch.Tensor, topk_idx: torch.Tensor, score_func: ScoreFunc,
                    counts: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/GShard balance loss E * sum_e f_e * P_e (1.0 when perfectly uniform).

    f_e = fraction of the T*k assignments routed to e (no grad), P_e = mean over tokens of the
    router probability of e (sigmoid scores are normalized over experts first). ``counts[E]``: the
    assignments per expert when the caller has them already (before any capacity drop).
    """
    t, e = scores.shape
    probs = scores if ScoreFunc(score_func) == ScoreFunc.softmax else scores / scores.sum(-1, keepdim=True)
    if counts is None:
        counts = moe_gpu.expert_counts(topk_idx.reshape(-1), e)
    frac = counts.to(scores.dtype) / topk_idx.numel()
    return e * (frac * probs.mean(0)).sum()


def importance_loss(topk_weight: torch.Tensor, topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Squared coefficient of variation (population variance / mean^2) of per-expert importance,
    importance_e = sum over tokens of the combine weight given to e (Shazeer et al. 2017)."""
    gates = torch.zeros(topk_weight.shape[0], num_experts, dtype=topk_weight.dtype, device=topk_weight.device)
    importance = gates.scatter(1, topk_idx, topk_weight).sum(0)  # [E]
    return importance.var(correction=0) / (importance.mean() ** 2 + 1e-10)


def seq_aux_loss(
    scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, seq: int, top_k: int
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss: mean over sequences of sum_e f_e * P_e with
    f_e = E/(k*S) * (tokens of the sequence routed to e), P_e = mean over the sequence of s_e / sum_j s_j."""
    e = scores.shape[1]
    probs = (scores / scores.sum(-1, keepdim=True)).view(batch, seq, e)
    counts = torch.zeros(batch, e, dtype=scores.dtype, device=scores.device)
    ones = torch.ones(batch, seq * top_k, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(1, topk_idx.view(batch, seq * top_k), ones)
    f = counts * (e / (top_k * seq))
    return (f * probs.mean(1)).sum(1).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def in_backward() -> bool:
    """True while autograd's backward runs this code (an activation-checkpointing recompute)."""
    return torch._C._current_graph_task_id() != -1


class Router(nn.Module):
    """Linear scores -> softmax/sigmoid -> (+bias, group limit) top-k -> combine weights.

    Buffers: ``expert_bias[E]`` (persistent; aux-loss-free balancing, added to the scores for the
    choice of experts only) and ``load_accum[E]`` (non-persistent; float count of assignments routed
    in training-mode forwards since the last ``update_bias``).
    """

    def __init__(self, hidden: int, cfg: MoEConfig, routing_groups: int) -> None:
        super().__init__()
        e = cfg.num_experts
        self.num_experts, self.top_k = e, cfg.top_k
        self.score_func = ScoreFunc(cfg.score_func)
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.route_scale
        self.noisy_gate_std, self.jitter_eps = cfg.noisy_gate_std, cfg.jitter_eps
        self.bias_update_rate = cfg.bias_update_rate
        self.num_groups = routing_groups
        self.max_groups = cfg.max_nodes_per_token if 0 < cfg.max_nodes_per_token < routing_groups else 0
        self.gate = nn.Linear(hidden, e, bias=False)
        self.register_buffer("expert_bias", torch.empty(e, dtype=torch.float32), persistent=True)
        self.register_buffer("load_accum", torch.empty(e, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # model.to(bf16) must not cast the balancing state: bf16 counts are exact only up to 256 and
        # a bias step of 1e-3 vanishes next to a bias of 1. Keep both buffers fp32 (as transformers does).
        super()._apply(fn, recurse)
        for name in ("expert_bias", "load_accum"):
            buf = self._buffers[name]
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Zero the balancing bias and the load counter."""
        self.expert_bias.zero_()
        self.load_accum.zero_()

    def forward(self, x: torch.Tensor) -> Routing:
        """x[T,H] -> Routing (fp32)."""
        jitter = self.training and self.jitter_eps > 0
        if not jitter and moe_gpu.router_linear_ok(x, self.gate.weight):
            logits = moe_gpu.router_linear(x, self.gate.weight)  # bf16 operands, fp32 products and sums
        else:
            dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32 (float64 stays, for gradcheck)
            x32 = x.to(dtype)
            if jitter:
                x32 = x32 * torch.empty_like(x32).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            logits = F.linear(x32, self.gate.weight.to(dtype))  # [T,E]
        noisy = logits
        if self.training and self.noisy_gate_std > 0:
            noisy = logits + torch.randn_like(logits) * self.noisy_gate_std
        scores = noisy.softmax(-1) if self.score_func == ScoreFunc.softmax else noisy.sigmoid()
        choice = scores.detach() + self.expert_bias  # bias steers the choice, never the weights
        if self.max_groups:
            keep = group_limited_mask(choice, self.num_groups, self.max_groups)
            choice = choice.masked_fill(~keep, float("-inf"))
        topk_idx = choice.topk(self.top_k, dim=-1).indices  # [T,k]
        topk_score = scores.gather(1, topk_idx)
        weight = topk_score
        if self.norm_topk_prob:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        weight = weight * self.route_scale
        # Count once per token: not again when activation checkpointing recomputes this forward
        if self.training and not in_backward():
            with torch.no_grad():
                self.load_accum += moe_gpu.expert_counts(topk_idx.reshape(-1), self.num_experts).float()
        return Routing(logits, scores, topk_idx, topk_score, weight)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, apply: torch.Tensor | None = None) -> None:
        """Move each expert's bias by +-rate toward balance: + for under-loaded, - for over-loaded.

        ``load[E]`` is the per-expert assignment count since the last update (the training loop
        all-reduces ``load_accum`` over data-parallel ranks). Resets ``load_accum``. Only the sign
        of mean - load matters, so a uniform scaling of the counts (e.g. forwards re-run by
        activation recomputation, which counts every token twice) changes nothing. ``apply``: an
        optional 0/1 tensor the move is multiplied by (the engine's device-side skip flag), so that a
        skipped step moves nothing without a host synchronization.
        """
        if load.shape != self.expert_bias.shape:
            raise ValueError(f"load has shape {tuple(load.shape)}, expected ({self.num_experts},)")
        if self.bias_update_rate > 0:
            load = load.float().to(self.expert_bias.device)
            move = self.bias_update_rate * torch.sign(load.mean() - load)
            if apply is not None:
                move = move * apply.to(move.device, move.dtype)
            self.expert_bias += move
        self.load_accum.zero_()


class GroupedExperts(nn.Module):
    """E routed experts with stacked weights: SwiGLU ``w13[E,2Fe,H]`` (rows [0, Fe) the gate projection
    w1, rows [Fe, 2Fe) the up projection w3) or GELU ``w1[E,Fe,H]``; ``w2[E,H,Fe]``.

    The gate and up projections share one parameter so that both are one grouped GEMM forward and
    backward (the layout of transformers' ``gate_up_proj``): on mixtral_h200's shapes that is 3.4% less
    time for these GEMMs than two of half the width (docs/performance.md, section 8).

    ``forward(x_sorted[N,H], num_tokens_per_expert[E])`` computes expert e on its contiguous block of
    rows (blocks in expert id order). Implementations (``impl``):
      grouped_mm  torch._grouped_mm (one kernel per matmul); on CUDA through moe_gpu.grouped_mlp on
                  the unpadded rows (group offsets need no alignment; tests/gpu checks uneven groups).
      padded_bmm  rows scattered to [E, max_count, H] blocks and batched matmuls (CUDA fallback).
      loop        a Python loop over experts: the CPU path. CPU runs are debug-sized, so padding
                  would waste work for nothing, and it is the one path that takes float64 (gradcheck).
      auto        CUDA: grouped_mm when supported (bf16, 16-byte rows: H, Fe multiples of 8, sm90+), else
                  padded_bmm -- never a Python loop on the GPU; CPU: loop.
    """

    def __init__(self, num_experts: int, hidden: int, inner: int, activation: Activation) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.inner = num_experts, hidden, inner
        self.activation = Activation(activation)
        if self.activation == Activation.swiglu:
            self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        else:
            self.w1 = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inner))
        self.impl = "auto"
        # Global id of local expert 0; an expert-parallel slice sets it so init_weights draws the
        # same values for expert e on every layout.
        self.first_expert = 0

    @property
    def swiglu(self) -> bool:
        return self.activation == Activation.swiglu

    @property
    def w_in(self) -> torch.Tensor:
        """The input projection: ``w13`` (SwiGLU) or ``w1`` (GELU), [E, 2Fe or Fe, H]."""
        return self.w13 if self.swiglu else self.w1

    def gate_up(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w1, w3) as views [E,Fe,H] of ``w13`` for SwiGLU; (w1, None) for GELU."""
        if self.swiglu:
            return self.w13[:, : self.inner], self.w13[:, self.inner:]
        return self.w1, None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # state dicts from before the packed layout hold w1 and w3 [E,Fe,H]: pack them (gate, then up)
        w1, w3, w13 = prefix + "w1", prefix + "w3", prefix + "w13"
        if self.swiglu and w13 not in state_dict and w1 in state_dict and w3 in state_dict:
            state_dict[w13] = torch.cat([state_dict.pop(w1), state_dict.pop(w3)], dim=1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        """The activation of the input projection's output h[..., 2Fe] (SwiGLU) or h[..., Fe] (GELU)."""
        return moe_gpu.swiglu_torch(h) if self.swiglu else F.gelu(h)

    def pick_impl(self, x: torch.Tensor) -> str:
        """The implementation ``forward`` uses for this input."""
        if self.impl != "auto":
            return self.impl
        if not x.is_cuda:
            return "loop"
        ok = (
            x.dtype == torch.bfloat16
            and self.grouped_mm_aligned(x.dtype)
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
        )
        return "grouped_mm" if ok else "padded_bmm"

    def grouped_mm_aligned(self, dtype: torch.dtype) -> bool:
        """torch._grouped_mm needs every row stride (H and Fe elements) to be a multiple of 16 bytes."""
        size = torch.empty((), dtype=dtype).element_size()
        return hasattr(torch, "_grouped_mm") and (self.hidden * size) % 16 == 0 and (self.inner * size) % 16 == 0

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        impl = self.pick_impl(x)
        if impl == "loop":
            return self._forward_loop(x, num_tokens_per_expert)
        if impl == "grouped_mm":
            return self._forward_grouped_mm(x, num_tokens_per_expert)
        if impl == "padded_bmm":
            return self._forward_padded_bmm(x, num_tokens_per_expert)
        raise ValueError(f"GroupedExperts.impl must be auto, loop, grouped_mm or padded_bmm, got {impl!r}")

    def _forward_loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outs = []
        w_in = self.w_in
        for e, xe in enumerate(torch.split(x, counts.tolist(), dim=0)):
            outs.append(self._act(xe @ w_in[e].t()) @ self.w2[e].t())
        return torch.cat(outs, dim=0) if outs else x.new_zeros(0, self.hidden)

    def _forward_grouped_mm(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if not self.grouped_mm_aligned(x.dtype):
            raise ValueError(
                f"grouped_mm needs hidden ({self.hidden}) and expert inner size ({self.inner}) rows of a "
                f"multiple of 16 bytes in {x.dtype}; use impl='auto'"
            )
        if x.is_cuda:  # unpadded rows: group offsets need no alignment, only row strides (checked above)
            return moe_gpu.grouped_mlp(x, counts, self.w_in, self.w2, swiglu=self.swiglu)
        offs = torch.cumsum(counts, 0).to(torch.int32)  # CPU kernels: no alignment at all
        h = torch._grouped_mm(x, self.w_in.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(self._act(h), self.w2.transpose(-2, -1), offs=offs)

    def _forward_padded_bmm(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        e = counts.numel()
        if x.shape[0] == 0:
            return x.new_zeros(0, self.hidden)
        max_count = int(counts.max())
        start = torch.cumsum(counts, 0) - counts
        expert_of_row = torch.repeat_interleave(torch.arange(e, device=x.device), counts)  # [N]
        slot = torch.arange(x.shape[0], device=x.device) - start[expert_of_row]
        xb = x.new_zeros(e, max_count, x.shape[1]).index_put((expert_of_row, slot), x)  # [E,C,H]
        yb = torch.bmm(self._act(torch.bmm(xb, self.w_in.transpose(1, 2))), self.w2.transpose(1, 2))
        return yb[expert_of_row, slot]


class MoE(nn.Module):
    """Routed experts (+ shared experts) replacing the dense MLP of a block.

    After ``forward``: ``aux_loss`` is the coefficient-weighted sum of the enabled balance losses
    (scalar, has grad when any coefficient is nonzero) and ``stats`` a detached dict for logging.
    """

    def __init__(self, hidden: int, activation: Activation, cfg: MoEConfig, routing_groups: int, ffn: int) -> None:
        super().__init__()
        inner = cfg.expert_ffn_hidden_size if cfg.expert_ffn_hidden_size > 0 else ffn
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = Router(hidden, cfg, routing_groups)
        self.experts = GroupedExperts(cfg.num_experts, hidden, inner, activation)
        self.shared = MLP(hidden, cfg.num_shared_experts * inner, activation) if cfg.num_shared_experts > 0 else None
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: dict[str, torch.Tensor] = {}
        self.dropped_frac = 0.0  # fraction of (token, expert) assignments dropped by the last forward

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity for a call with num_tokens tokens; None when dropless."""
        if self.cfg.dropless:
            return None
        factor = self.cfg.capacity_factor if self.training else self.cfg.eval_capacity_factor
        return capacity_of(num_tokens, self.num_experts, self.top_k, factor, self.cfg.min_capacity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.cfg.dropless:
            return moe_forward(self, x)  # same function, fused permutation kernels
        b, s, h = x.shape
        xf = x.reshape(b * s, h)
        r = self.router(xf)
        order, counts, routed = dispatch_order(
            r.topk_idx, r.topk_score, self.num_experts, self.capacity(b * s), self.cfg.drop_policy
        )
        token = order // self.top_k  # [N] source token of each kept assignment
        y_sorted, shared = self.run_experts(xf[token], counts, xf)  # [N,H], [T,H] or None
        w = r.topk_weight.reshape(-1)[order].to(y_sorted.dtype)
        y = torch.zeros_like(xf).index_add(0, token, y_sorted * w[:, None])  # unpermute + combine
        if shared is not None:
            y = y + shared
        self._losses_and_stats(r, b, s, routed, order.numel())
        return y.view(b, s, h)

    def run_experts(
        self, x_sorted: torch.Tensor, counts: torch.Tensor, xf: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Routed experts on the sorted rows and the shared experts on all tokens: (y_sorted, shared or None).

        An experts module with ``forward_with_side`` (the expert-parallel wrapper) runs the shared
        experts while its dispatch all-to-all is in flight; otherwise they run one after the other.
        """
        side = getattr(self.experts, "forward_with_side", None)
        if self.shared is not None and side is not None:
            shared = self.shared
            return side(x_sorted, counts, lambda: shared(xf))
        y_sorted = self.experts(x_sorted, counts)
        return y_sorted, (self.shared(xf) if self.shared is not None else None)

    def _losses_and_stats(self, r: Routing, b: int, s: int, routed: torch.Tensor, kept: int) -> None:
        c = self.cfg
        losses: dict[str, torch.Tensor] = {}
        if c.aux_loss_coef > 0:
            losses["aux_loss"] = c.aux_loss_coef * switch_aux_loss(r.scores, r.topk_idx, self.router.score_func, routed)
        if c.importance_loss_coef > 0:
            losses["importance_loss"] = c.importance_loss_coef * importance_loss(
                r.topk_weight, r.topk_idx, self.num_experts
            )
        if c.seq_aux_loss_coef > 0:
            losses["seq_aux_loss"] = c.seq_aux_loss_coef * seq_aux_loss(r.scores, r.topk_idx, b, s, self.top_k)
        if c.z_loss_coef > 0:
            losses["z_loss"] = c.z_loss_coef * z_loss(r.logits)
        total = r.logits.new_zeros(())
        for v in losses.values():
            total = total + v
        self.aux_loss = total
        load = routed.float()
        # the same figure as a Python float: ``kept`` is a host-side count, so reading it needs no sync
        self.dropped_frac = 1.0 - kept / max(r.topk_idx.numel(), 1)
        self.stats = {
            "tokens_per_expert": routed.detach(),
            "load_cv": (load.std(correction=0) / load.mean().clamp_min(1e-10)).detach(),
            # torch.full, not torch.tensor: a host-to-device copy would wait for the whole stream
            "dropped_frac": torch.full((), 1.0 - kept / max(r.topk_idx.numel(), 1), device=load.device),
            **{k: v.detach() for k, v in losses.items()},
        }


def moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """``MoE.forward`` through the fast path of ``moe_gpu``'s kernels: same outputs, losses and stats
    (dropless only).

    ``moe.experts`` may be any module with the ``(x_sorted, counts)`` signature (an expert-parallel
    wrapper too); a plain ``GroupedExperts`` is run through ``moe_gpu.grouped_mlp``.
    """
    if not moe.cfg.dropless:
        raise ValueError("the MoE fast path needs moe.dropless=true (capacity dropping changes N)")
    b, s, h = x.shape
    xf = x.reshape(b * s, h)
    r = moe.router(xf)
    flat_e = r.topk_idx.reshape(-1)  # [N] expert of assignment a = t*k + j
    order, inv, counts = moe_gpu.sort_by_expert(flat_e, moe.num_experts)  # tokens of one expert in position order
    x_sorted = moe_gpu.permute(xf, order, inv, moe.top_k)  # [N,H]
    ex = moe.experts
    # exact type: an expert-parallel subclass must run its own forward (the all-to-all exchange)
    if type(ex) is GroupedExperts and moe_gpu.grouped_mm_ok(x_sorted, ex.hidden, ex.inner):
        y_sorted = moe_gpu.grouped_mlp(x_sorted, counts, ex.w_in, ex.w2, swiglu=ex.swiglu)
        shared = moe.shared(xf) if moe.shared is not None else None
    else:
        y_sorted, shared = moe.run_experts(x_sorted, counts, xf)
    y = moe_gpu.combine(y_sorted, r.topk_weight, inv)  # fp32 weights: the kernels accumulate in fp32
    if shared is not None:
        y = y + shared
    moe._losses_and_stats(r, b, s, counts, order.numel())
    return y.view(b, s, h)
