"""Tensor and sequence parallelism's communication: the region ops and the shard helpers.

Shape legend: B batch, S sequence, H hidden, t = tp size; ``X/t`` is this rank's shard.

Each region op is an autograd function around one collective over the TP group (g = this rank's
gradient); with no group (or a group of one) it is the identity:
  copy_to_tp_region          fwd identity           bwd all-reduce(g)      (input of column-parallel)
  reduce_from_tp_region      fwd all-reduce         bwd identity           (output of row-parallel)
  gather_from_sp_region      fwd all-gather over S  bwd reduce-scatter(g)  (SP input of column-parallel)
  reduce_scatter_to_sp_region fwd reduce-scatter    bwd all-gather(g)      (SP output of row-parallel)
plus, for compute that every TP rank repeats on the whole sequence (the MoE layer, MLA's replicated
down-projections) inside a sequence-parallel stream:
  gather_sp_replicated       fwd all-gather over S  bwd split(g)           (every rank computes the same)
  split_to_sp_region         fwd split over S       bwd all-gather(g)
The sharded layers and the code that applies them to the Transformer are in parallel/tensor.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Function

SEQ_DIM = 1  # model activations are [B, S, H]
# torch 2.13 renames the tensor collectives (the old names warn); older torch has only the old ones.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group: Any) -> int:
    return dist.get_world_size(group) if group is not None else 1


def _rank(group: Any) -> int:
    return dist.get_rank(group) if group is not None else 0


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """Concatenate every rank's x along ``dim`` (rank order)."""
    t = _size(group)
    parts = x.movedim(dim, 0).contiguous()  # [X, ...]
    out = parts.new_empty((t * parts.shape[0], *parts.shape[1:]))
    _all_gather_tensor(out, parts, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """Sum over ranks, keep this rank's 1/t chunk along ``dim``."""
    t = _size(group)
    if x.shape[dim] % t:
        raise ValueError(
            f"parallel.sequence_parallel needs the sequence length (data.seq_len) {x.shape[dim]} "
            f"divisible by parallel.tp={t}"
        )
    parts = x.movedim(dim, 0).contiguous()
    out = parts.new_empty((parts.shape[0] // t, *parts.shape[1:]))
    _reduce_scatter_tensor(out, parts, group=group)
    return out.movedim(0, dim)


def _split(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    t = _size(group)
    if x.shape[dim] % t:
        raise ValueError(
            f"parallel.sequence_parallel needs the sequence length (data.seq_len) {x.shape[dim]} "
            f"divisible by parallel.tp={t}"
        )
    return x.chunk(t, dim=dim)[_rank(group)].contiguous()


class _CopyToTP(Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(g, ctx.group), None


class _ReduceFromTP(Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g, None


class _GatherFromSP(Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, grad_reduce: bool) -> torch.Tensor:
        ctx.group, ctx.grad_reduce = group, grad_reduce
        return _all_gather(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.grad_reduce:  # consumers hold different shards: their partial grads must be summed
            return _reduce_scatter(g, ctx.group, SEQ_DIM), None, None
        return _split(g, ctx.group, SEQ_DIM), None, None  # replicated consumers: g is already complete


class _ReduceScatterToSP(Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(g, ctx.group, SEQ_DIM), None


class _SplitToSP(Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _split(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather(g, ctx.group, SEQ_DIM), None


class _CopyTailToTP(Function):
    """Identity; backward all-reduces only the last ``num_tail`` features of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, num_tail: int) -> torch.Tensor:
        ctx.group, ctx.num_tail = group, num_tail
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        head, tail = g.split([g.shape[-1] - ctx.num_tail, ctx.num_tail], dim=-1)
        return torch.cat([head, _all_reduce(tail, ctx.group)], dim=-1), None, None


def copy_to_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over ``group`` (input of column-parallel layers)."""
    return _CopyToTP.apply(x, group) if _size(group) > 1 else x


def copy_tail_to_tp_region(x: torch.Tensor, group: Any, num_tail: int) -> torch.Tensor:
    """Like ``copy_to_tp_region`` for the last ``num_tail`` features of x only (the rest is untouched).

    For a replicated tensor whose tail feeds every local head directly (MLA's shared rotary key).
    """
    return _CopyTailToTP.apply(x, group, num_tail) if _size(group) > 1 else x


def reduce_from_tp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """All-reduce forward; identity gradient (output of row-parallel layers)."""
    return _ReduceFromTP.apply(x, group) if _size(group) > 1 else x


def gather_from_sp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[B,S/t,H] -> [B,S,H] all-gather; gradient reduce-scattered (input of column-parallel layers)."""
    return _GatherFromSP.apply(x, group, True) if _size(group) > 1 else x


def gather_sp_replicated(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[B,S/t,H] -> [B,S,H] all-gather for compute that every TP rank repeats; gradient split."""
    return _GatherFromSP.apply(x, group, False) if _size(group) > 1 else x


def reduce_scatter_to_sp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[B,S,H] partial sums -> [B,S/t,H] reduce-scatter; gradient all-gathered (row-parallel output)."""
    return _ReduceScatterToSP.apply(x, group) if _size(group) > 1 else x


def split_to_sp_region(x: torch.Tensor, group: Any) -> torch.Tensor:
    """[B,S,H] replicated -> [B,S/t,H] this rank's chunk; gradient all-gathered."""
    return _SplitToSP.apply(x, group) if _size(group) > 1 else x


def tag_tp_param(param: nn.Parameter, partition_dim: int) -> nn.Parameter:
    """Mark ``param`` as a TP shard split along ``partition_dim`` (Megatron's attribute names)."""
    param.tensor_model_parallel = True  # type: ignore[attr-defined]
    param.partition_dim = partition_dim  # type: ignore[attr-defined]
    param.partition_stride = 1  # type: ignore[attr-defined]
    return param


def shard_rows(weight: torch.Tensor, group: Any, *, what: str) -> torch.Tensor:
    """This rank's contiguous 1/t block of rows of ``weight`` (a copy, so the full tensor can go)."""
    t, r = _size(group), _rank(group)
    if weight.shape[0] % t:
        raise ValueError(f"{what}: {weight.shape[0]} rows are not divisible by parallel.tp={t}")
    n = weight.shape[0] // t
    return weight.detach()[r * n : (r + 1) * n].clone()
