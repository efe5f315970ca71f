"""Tensor parallelism (Megatron style) on plain tensors: sharded layers and their application.

Shape legend: B batch, S sequence, H hidden, V vocabulary, t = tp size; ``X/t`` is this rank's shard.

Parameters stay ordinary ``nn.Parameter`` tensors (no DTensor), so DeepSpeed's optimizer and ZeRO see
plain shards. Every TP-sharded parameter is tagged ``tensor_model_parallel = True`` with
``partition_dim`` (0: output rows split, column-parallel; 1: input columns split, row-parallel) so the
engine counts each shard once in a global gradient norm. Replicated parameters (norms, router,
experts, MLA down-projections) carry no TP tag: they and their gradients are identical on every TP
rank. Under sequence parallelism the block norms see 1/t of the tokens; their weights are tagged
``sequence_parallel = True`` and a gradient hook sums their gradients over the TP group.

The region ops that move activations and gradients in and out of the TP region (``copy_to_tp_region``,
``reduce_from_tp_region``, ``gather_from_sp_region`` and the rest, with their gradients) live in
parallel/tensor_comm.py; they stay importable from here.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from hpframe.parallel.tensor_comm import (
    _all_reduce,
    _rank,
    _size,
    copy_tail_to_tp_region,
    copy_to_tp_region,
    gather_from_sp_region,
    gather_sp_replicated,
    reduce_from_tp_region,
    reduce_scatter_to_sp_region,
    shard_rows,
    split_to_sp_region,
    tag_tp_param,
)


class ColumnParallelLinear(nn.Module):
    """y[..., out/t] = x[..., in] @ W_shard^T with W split by output rows (no bias).

    The input must already be in the TP region (``copy_to_tp_region`` or ``gather_from_sp_region``
    applied once by the caller, so q/k/v or w1/w3 share a single backward all-reduce).
    """

    def __init__(self, weight_shard: torch.Tensor, group: Any) -> None:
        super().__init__()
        self.weight = tag_tp_param(nn.Parameter(weight_shard), partition_dim=0)
        self.group = group
        self.in_features, self.out_features = weight_shard.shape[1], weight_shard.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Any, *, what: str) -> ColumnParallelLinear:
        """Shard a full nn.Linear (bias-free) by output rows."""
        if linear.bias is not None:
            raise ValueError(f"{what}: tensor parallelism supports bias-free linears only")
        return cls(shard_rows(linear.weight, group, what=what), group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features} (shard), tp={_size(self.group)}"


class RowParallelLinear(nn.Module):
    """partial[..., out] = x[..., in/t] @ W_shard^T, W split by input columns (no bias).

    Returns this rank's partial sum; the caller combines the partial sums over the TP group (every
    use in hpframe does so in a forward hook outside a checkpointed forward: ``_exit_hook``).
    """

    def __init__(self, weight_shard: torch.Tensor, group: Any) -> None:
        super().__init__()
        self.weight = tag_tp_param(nn.Parameter(weight_shard), partition_dim=1)
        self.group = group
        self.in_features, self.out_features = weight_shard.shape[1], weight_shard.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: Any, *, what: str) -> RowParallelLinear:
        """Shard a full nn.Linear (bias-free) by input columns."""
        if linear.bias is not None:
            raise ValueError(f"{what}: tensor parallelism supports bias-free linears only")
        shard = shard_rows(linear.weight.t(), group, what=what).t().contiguous()
        return cls(shard, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (shard), out_features={self.out_features}, partial sums"


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over the TP group: rank r holds rows [r*V/t, (r+1)*V/t).

    Each rank looks up the tokens it owns (zeros elsewhere); the sum over ranks (all-reduce, or a
    reduce-scatter over the sequence under SP) gives every token its row. The parameter is still
    called ``weight`` so a tied LM head (``embed.weight``) reads the same shard.
    """

    def __init__(self, embedding: nn.Embedding, group: Any, *, sequence_parallel: bool = False) -> None:
        super().__init__()
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("vocab-parallel embedding supports plain embeddings (no padding_idx or max_norm)")
        self.group, self.sequence_parallel = group, sequence_parallel
        self.num_embeddings = embedding.num_embeddings
        self.weight = tag_tp_param(nn.Parameter(shard_rows(embedding.weight, group, what="embedding")), 0)
        self.vocab_start = _rank(group) * self.weight.shape[0]
        self.vocab_end = self.vocab_start + self.weight.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)  # [B,S,H]
        if self.sequence_parallel:
            return reduce_scatter_to_sp_region(partial, self.group)
        return reduce_from_tp_region(partial, self.group)

    def extra_repr(self) -> str:
        return f"vocab rows [{self.vocab_start}, {self.vocab_end}) of {self.num_embeddings}"


class _VocabParallelCE(Function):
    """Per-token cross-entropy from vocab-sharded logits, without gathering them.

    Forward: global max (all-reduce MAX), the target's logit (owned by one rank; all-reduce SUM),
    and the sum of exponentials (all-reduce SUM). Backward: softmax - onehot(target), locally.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, group: Any, ignore_index: int) -> torch.Tensor:
        v_local = logits.shape[-1]
        start = _rank(group) * v_local
        ctx.dtype = logits.dtype
        logits = logits.float()
        lmax = logits.max(dim=-1).values
        dist.all_reduce(lmax, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - lmax[..., None]  # [..., V/t]
        outside = (targets < start) | (targets >= start + v_local)
        local_t = (targets - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_t[..., None]).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        ignored = targets == ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        softmax = exp.div_(sum_exp[..., None])
        ctx.save_for_backward(softmax, local_t, outside | ignored, ignored)
        return loss

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        softmax, local_t, not_here, ignored = ctx.saved_tensors
        grad = softmax.clone()
        onehot = (~not_here).to(grad.dtype)[..., None]
        grad.scatter_add_(-1, local_t[..., None], -onehot)
        grad.mul_((g * (~ignored).to(g.dtype))[..., None])
        return grad.to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Any,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of vocab-sharded logits ``[..., V/t]`` against global targets ``[...]``.

    Equals ``F.cross_entropy(full_logits, targets)`` (fp32) on every TP rank. ``reduction``: ``mean``
    over non-ignored targets, ``sum``, or ``none`` (per-token losses, 0 at ignored positions).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
    if _size(tp_group) == 1:
        flat = F.cross_entropy(
            logits_local.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index, reduction="none"
        )
        losses = flat.view(targets.shape)
    else:
        losses = _VocabParallelCE.apply(logits_local, targets, tp_group, ignore_index)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (targets != ignore_index).sum().clamp_min(1)


# ---- applying TP/SP to the hpframe Transformer (in place) ------------------------------------------
# Communication sits in module hooks around ``attn`` and ``mlp`` (outside their forward), so selective
# checkpointing of those forwards never repeats a collective. Inside the region the forward is local.


def _enter_hook(group: Any, sequence_parallel: bool, replicated: bool) -> Callable[..., Any]:
    """Forward pre-hook that brings the block input [B,S(/t),H] into the TP region."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if sequence_parallel:
            x = gather_sp_replicated(x, group) if replicated else gather_from_sp_region(x, group)
        elif not replicated:
            x = copy_to_tp_region(x, group)
        return (x, *args[1:])

    return hook


def _exit_hook(group: Any, sequence_parallel: bool, partial: bool) -> Callable[..., Any]:
    """Forward hook that combines partial sums (row-parallel) or re-splits replicated outputs (SP)."""

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if partial:
            return reduce_scatter_to_sp_region(out, group) if sequence_parallel else reduce_from_tp_region(out, group)
        return split_to_sp_region(out, group) if sequence_parallel else out

    return hook


def _output_hook(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    return lambda module, args, out: fn(out)


def _divisible(what: str, n: int, t: int) -> int:
    if n % t:
        raise ValueError(f"{what}={n} is not divisible by parallel.tp={t}")
    return n // t


def _shard_gqa(attn: nn.Module, group: Any, t: int) -> None:
    """q/k/v column-parallel by heads (rank r: query heads [r*nh/t, ...) and their kv heads), wo row."""
    attn.num_heads = _divisible("model.num_heads", attn.num_heads, t)
    attn.num_kv_heads = _divisible("model.num_kv_heads", attn.num_kv_heads, t)
    for name in ("wq", "wk", "wv"):
        setattr(attn, name, ColumnParallelLinear.from_linear(getattr(attn, name), group, what=f"attention.{name}"))
    attn.wo = RowParallelLinear.from_linear(attn.wo, group, what="attention.wo")
    for norm in (attn.q_norm, attn.k_norm):  # per-head norms (qk_norm) see this rank's heads only:
        if norm is not None:  # their weight gradients are partial sums over the heads
            norm.weight.register_hook(lambda g: _all_reduce(g.clone(), group))


def _shard_mla(attn: nn.Module, group: Any, t: int) -> None:
    """wq_b (or wq) and wkv_b column-parallel by heads, wo row; wq_a, wkv_a and the latent norms replicated.

    The replicated latents feed every local head, so their gradients are partial sums over heads:
    copy_to_tp on the normalized q and kv latents and on the shared rotary key (the last dr features
    of wkv_a's output) makes the replicated weights' gradients complete on every rank.
    """
    attn.num_heads = _divisible("model.num_heads", attn.num_heads, t)
    if attn.wq is not None:
        attn.wq = ColumnParallelLinear.from_linear(attn.wq, group, what="attention.wq")
        attn.wq.register_forward_pre_hook(lambda m, args: (copy_to_tp_region(args[0], group), *args[1:]))
    else:
        attn.wq_b = ColumnParallelLinear.from_linear(attn.wq_b, group, what="attention.wq_b")
        attn.q_norm.register_forward_hook(_output_hook(lambda y: copy_to_tp_region(y, group)))
    attn.wkv_b = ColumnParallelLinear.from_linear(attn.wkv_b, group, what="attention.wkv_b")
    attn.kv_norm.register_forward_hook(_output_hook(lambda y: copy_to_tp_region(y, group)))
    dr = attn.dr
    attn.wkv_a.register_forward_hook(_output_hook(lambda y: copy_tail_to_tp_region(y, group, dr)))
    attn.wo = RowParallelLinear.from_linear(attn.wo, group, what="attention.wo")


def _sp_norm(norm: nn.Module, group: Any) -> None:
    """A norm on a sequence shard sees 1/t of the tokens: sum its weight gradient over the TP group."""
    w = norm.weight
    w.sequence_parallel = True  # type: ignore[attr-defined]
    w.register_hook(lambda g: _all_reduce(g.clone(), group))


def apply_tp(model: nn.Module, group: Any, *, sequence_parallel: bool = False) -> nn.Module:
    """Shard ``model`` (a materialized hpframe Transformer) over the TP ``group``, in place.

    Attention (GQA or MLA) and dense MLPs (w1, w3 column, w2 row) are split by heads / inner units;
    the embedding and LM head by vocabulary (forward returns this rank's logits [B,S,V/t]: use
    ``vocab_parallel_cross_entropy``). MoE layers stay replicated (expert TP = 1): router, routed
    and shared experts see the same tokens on every TP rank, and their gradients are identical.
    With ``sequence_parallel`` the residual stream is [B,S/t,H] between blocks.
    """
    if _size(group) == 1:
        return model
    apply_tp_outer(model, group, sequence_parallel=sequence_parallel)
    for block in model.layers:
        apply_tp_block(block, group, sequence_parallel=sequence_parallel)
    return model


def apply_tp_outer(model: nn.Module, group: Any, *, sequence_parallel: bool = False,
                   embed: bool = True, head: bool = True) -> None:
    """The embedding (``embed``), the LM head (``head``) and the final norm's hooks of ``apply_tp``.

    ``embed``/``head`` False leave that part alone (a pipeline stage that never runs it)."""
    t, sp = _size(group), sequence_parallel
    _divisible("model.vocab_size", model.embed.num_embeddings, t)
    if embed:
        model.embed = VocabParallelEmbedding(model.embed, group, sequence_parallel=sp)
    if head and model.head is not None:
        model.head = ColumnParallelLinear.from_linear(model.head, group, what="head")
        model.head.vocab_start = _rank(group) * model.head.out_features  # padded rows are masked by index
    # The LM head is column-parallel: its input enters the TP region after the final norm.
    enter_head = (lambda y: gather_from_sp_region(y, group)) if sp else (lambda y: copy_to_tp_region(y, group))
    model.norm.register_forward_hook(_output_hook(enter_head))
    if sp:
        _sp_norm(model.norm, group)


def apply_tp_block(block: nn.Module, group: Any, *, sequence_parallel: bool = False) -> None:
    """Shard one transformer block over the TP ``group`` (the per-block part of ``apply_tp``)."""
    from hpframe.models.layers import MLP, Attention
    from hpframe.models.mla import MLAttention
    from hpframe.models.moe import MoE

    t, sp = _size(group), sequence_parallel
    attn, mlp = block.attn, block.mlp
    if isinstance(attn, Attention):
        _shard_gqa(attn, group, t)
        attn.register_forward_pre_hook(_enter_hook(group, sp, replicated=False))
    elif isinstance(attn, MLAttention):
        _shard_mla(attn, group, t)
        attn.register_forward_pre_hook(_enter_hook(group, sp, replicated=True))
    else:
        raise ValueError(f"tensor parallelism does not know attention module {type(attn).__name__}")
    attn.register_forward_hook(_exit_hook(group, sp, partial=True))
    if isinstance(mlp, MoE):
        if sp:
            mlp.register_forward_pre_hook(_enter_hook(group, sp, replicated=True))
            mlp.register_forward_hook(_exit_hook(group, sp, partial=False))
    elif isinstance(mlp, MLP):
        mlp.w1 = ColumnParallelLinear.from_linear(mlp.w1, group, what="mlp.w1")
        if mlp.w3 is not None:
            mlp.w3 = ColumnParallelLinear.from_linear(mlp.w3, group, what="mlp.w3")
        mlp.w2 = RowParallelLinear.from_linear(mlp.w2, group, what="mlp.w2")
        mlp.register_forward_pre_hook(_enter_hook(group, sp, replicated=False))
        mlp.register_forward_hook(_exit_hook(group, sp, partial=True))
    else:
        raise ValueError(f"tensor parallelism does not know MLP module {type(mlp).__name__}")
    if sp:
        _sp_norm(block.attn_norm, group)
        _sp_norm(block.mlp_norm, group)
