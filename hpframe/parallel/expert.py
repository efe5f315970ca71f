"""Expert parallelism: all-to-all dispatch and combine around the grouped experts of each MoE layer.

Shape legend: N (token, expert) assignments this rank routed, M assignments this rank receives,
H hidden, E global experts, P = ep size, L = E / P experts per EP rank.

``ExpertParallelExperts`` replaces ``moe.experts`` (a ``GroupedExperts``): it keeps the call signature
``forward(x_sorted[N,H], num_tokens_per_expert[E]) -> y_sorted[N,H]`` with GLOBAL expert ids, holds
only this EP rank's L experts (the contiguous ids ``plan.experts.local_experts(ep_rank)``, recorded in
``global_expert_ids``) and keeps the parameter names (``w13``/``w2``, or ``w1``/``w2`` for GELU), so
checkpoints and the engine see ``layers.i.mlp.experts.w13`` with the local shape [L, 2Fe, H]. One forward:

  1. counts[E] -> counts_send[P, L]; one all-to-all -> counts_recv[P, L] (what each source sends me)
  2. x_sorted is grouped by expert id, hence by destination rank (experts are contiguous per rank)
  3. variable-size all-to-all of the rows: [N,H] -> x_recv[M,H], ordered (source, local expert)
  4. stable re-sort by local expert -> x_local[M,H]; the local GroupedExperts computes y_local
  5. undo the re-sort and send the rows back with the reverse all-to-all -> y_sorted[N,H]

Every all-to-all is an autograd Function whose backward is the reverse exchange, so gradients flow
back to the senders. With shared experts (``forward_with_side``), step 3 only starts the exchange,
the shared experts run on the compute stream meanwhile, and the layer waits for the rows before step
4 (``parallel.ep_overlap``). Capacity is applied by the MoE layer before step 1 (dropped assignments are
never sent), so the same module serves dropless and capacity-limited routing.

A rank that receives no rows still takes part in every exchange, forward and backward, and its
local expert weights get zero gradients (not None): ZeRO's reduce-scatter then stays in step.

Gradient scaling: the expert weights of rank r collect the gradients of the tokens of its whole EP
group. A data-parallel mean over dp ranks is therefore a SUM over the edp group divided by dp (not by
edp); dense weights are a sum over dp divided by dp.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Function
from torch.utils.checkpoint import checkpoint

from hpframe.models.moe import GroupedExperts
from hpframe.models.moe_gpu import sort_by_expert


class _AllToAllSingle(Function):
    """Variable-size all-to-all of rows; backward sends the gradients back with the splits swapped."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
    ) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        gx = g.new_empty((sum(ctx.in_splits), *g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return gx, None, None, None


def all_to_all_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> torch.Tensor:
    """Send ``in_splits[p]`` consecutive rows of x to rank p of ``group``; receive ``out_splits[p]`` from p."""
    return _AllToAllSingle.apply(x, out_splits, in_splits, group)


class _Pending:
    """The in-flight exchange of ``_AllToAllStart``: ``wait()`` before anything reads its output."""

    def __init__(self) -> None:
        self.work: Any = None
        self.send: torch.Tensor | None = None

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()  # NCCL: the current stream waits (the host does not); gloo: the host waits
        self.work = self.send = None


class _AllToAllStart(Function):
    """``_AllToAllSingle`` whose forward only starts the exchange (``pending.wait()`` completes it).

    The returned tensor is being written by the collective: the caller may launch work that does not
    read it, then must call ``pending.wait()``. The backward is the ordinary (blocking) reverse exchange.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any,
                pending: _Pending) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        pending.send = x.contiguous()  # alive until the exchange is done
        pending.work = dist.all_to_all_single(out, pending.send, out_splits, in_splits, group=group, async_op=True)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        gx = g.new_empty((sum(ctx.in_splits), *g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return gx, None, None, None, None


class _PermuteRows(Function):
    """``x[perm]`` for a permutation ``perm`` (with ``inv`` its inverse): the backward is the gather
    ``g[inv]``, not the scatter-add ``index_select`` would use (bf16 atomics: 2 ms per call on the
    H200 EP benchmark's 16k x 2048 rows)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inv,) = ctx.saved_tensors
        return g.index_select(0, inv), None, None


class _KeepInGraph(Function):
    """Return y unchanged; give zero gradients to ``inputs`` (keeps them in the graph with 0 rows)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in inputs]
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (g, *(torch.zeros(s, dtype=d, device=dev) for s, d, dev in ctx.shapes))


class ExpertParallelExperts(GroupedExperts):
    """The local slice of a GroupedExperts plus the all-to-all exchange with the other EP ranks."""

    def __init__(self, experts: GroupedExperts, *, global_expert_ids: range, ep_group: Any, ep_size: int,
                 overlap: bool = True) -> None:
        num_global = experts.num_experts
        if num_global % ep_size:
            raise ValueError(f"moe.num_experts={num_global} is not divisible by parallel.ep={ep_size}")
        local = len(global_expert_ids)
        if local * ep_size != num_global or global_expert_ids.step != 1:
            raise ValueError(
                f"expert ids {global_expert_ids} are not a contiguous 1/{ep_size} block of {num_global} experts"
            )
        with torch.device(experts.w2.device):
            super().__init__(local, experts.hidden, experts.inner, experts.activation)
        self.impl = experts.impl
        lo, hi = global_expert_ids.start, global_expert_ids.stop
        # Copies of this rank's block, so the full [E, ...] tensors can be freed.
        for name, w in experts.named_parameters(recurse=False):
            setattr(self, name, nn.Parameter(w.detach()[lo:hi].clone()))
        for p in self.parameters():
            p.expert_parallel = True  # type: ignore[attr-defined]
        self.num_global_experts = num_global
        self.global_expert_ids = global_expert_ids
        self.first_expert = lo  # Transformer.init_weights seeds expert i of this slice by global id lo + i
        self.checkpoint_compute = False  # set by selective activation checkpointing
        self.ep_group, self.ep_size = ep_group, ep_size
        self.overlap = overlap  # shared experts run during the dispatch exchange (forward_with_side)
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return self.forward_with_side(x, num_tokens_per_expert, None)[0]

    def forward_with_side(
        self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor, side: Callable[[], torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward``, plus ``side()`` (the shared experts) computed while the dispatch exchange is in
        flight when ``overlap`` is on (after it otherwise); returns (y_sorted, side() or None)."""
        p, e_local = self.ep_size, self.num_experts
        if num_tokens_per_expert.numel() != self.num_global_experts:
            raise ValueError(
                f"got {num_tokens_per_expert.numel()} expert counts, expected {self.num_global_experts} (global)"
            )
        # 1. counts_send[p, j]: rows for expert j of rank p; counts_recv[p, j]: rows from p for my expert j.
        counts_send = num_tokens_per_expert.to(torch.int64).reshape(p, e_local)
        counts_recv = torch.empty_like(counts_send)
        dist.all_to_all_single(counts_recv, counts_send.contiguous(), group=self.ep_group)
        # One host sync for both split lists (all-to-all sizes must be known on the host).
        splits = torch.stack([counts_send.sum(1), counts_recv.sum(1)]).cpu()
        in_splits, out_splits = splits[0].tolist(), splits[1].tolist()
        # 2-3. x is grouped by expert, so the first in_splits[0] rows go to rank 0, and so on.
        if side is not None and self.overlap:
            pending = _Pending()
            x_recv = _AllToAllStart.apply(x, out_splits, in_splits, self.ep_group, pending)  # [M,H]
            side_out = side()  # reads nothing the exchange writes
            pending.wait()
        else:
            x_recv = all_to_all_rows(x, out_splits, in_splits, self.ep_group)  # [M,H] (source, local expert)
            side_out = side() if side is not None else None
        # 4. stable sort by local expert: rows of expert j from source 0, then 1, ...
        recv_expert = torch.repeat_interleave(  # [M] local expert of each received row; no host sync
            torch.arange(e_local, device=x.device).repeat(p),
            counts_recv.reshape(-1).to(x.device),
            output_size=sum(out_splits),
        )
        perm, inv, _ = sort_by_expert(recv_expert, e_local)
        x_local = _PermuteRows.apply(x_recv, perm, inv)
        local_counts = counts_recv.sum(0)
        if x_local.shape[0] == 0:
            # Nothing arrived: no kernel runs, but the weights and the received rows stay in the graph,
            # so this rank still joins the backward all-to-alls and its weights get zero (not None) grads.
            y_local = x_local.new_zeros(0, self.hidden)
            if torch.is_grad_enabled():
                y_local = _KeepInGraph.apply(y_local, x_recv, *self.parameters(recurse=False))
        elif self.checkpoint_compute and torch.is_grad_enabled():
            y_local = checkpoint(GroupedExperts.forward, self, x_local, local_counts, use_reentrant=False)
        else:
            y_local = super().forward(x_local, local_counts)  # [M,H]
        # 5. undo the sort, send the rows back to their sources.
        y_recv = _PermuteRows.apply(y_local, inv, perm) if y_local.shape[0] else y_local
        y = all_to_all_rows(y_recv, in_splits, out_splits, self.ep_group)  # [N,H]
        self.stats = {"rows_sent_per_rank": splits[0], "rows_received_per_rank": splits[1]}
        return y, side_out

    def extra_repr(self) -> str:
        ids = self.global_expert_ids
        return f"global experts [{ids.start}, {ids.stop}) of {self.num_global_experts}, ep={self.ep_size}"


def apply_ep(model: nn.Module, plan: Any, groups: Any, *, overlap: bool = True) -> nn.Module:
    """Replace the experts of every MoE layer by this EP rank's ExpertParallelExperts (in place).

    ``overlap`` (``parallel.ep_overlap``): compute the shared experts while the dispatch all-to-all is
    in flight."""
    for moe in model.moe_modules():
        apply_ep_moe(moe, plan, groups, overlap=overlap)
    return model


def apply_ep_moe(moe: nn.Module, plan: Any, groups: Any, *, overlap: bool = True) -> None:
    """Replace the experts of one MoE layer by this EP rank's ExpertParallelExperts (in place)."""
    if plan.experts is None:
        raise ValueError(f"parallel.ep={plan.ep} needs a model with experts (moe.num_experts > 0)")
    ids = plan.experts.local_experts(groups.ep_rank)
    moe.experts = ExpertParallelExperts(
        moe.experts, global_expert_ids=ids, ep_group=groups.ep, ep_size=groups.ep_size, overlap=overlap
    )
