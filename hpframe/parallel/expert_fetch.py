"""Expert parallelism by moving experts (``moe.dispatch=experts``): tokens stay, weights travel.

Shape legend: E global experts, P = ep size, L = E / P experts per EP rank, n nodes one EP group
spans, k = P / n EP ranks per node, Q = the numel of one rank's packed expert block (w13 or w1, then
w2), N (token, expert) rows of this rank.

``ExpertFetchExperts`` replaces ``moe.experts`` like ``ExpertParallelExperts`` (it is one: same local
parameters, names, shapes and ``global_expert_ids``, so checkpoints, ZeRO and activation
checkpointing see no difference) but its forward never sends a token. Per call:

  1. fetch: the EP group's expert blocks are all-gathered into the full [E, ...] weights. Across
     nodes first, among the n ranks with the same position j in their node (each remote block enters
     a node once), then inside the node among its k ranks: [Q] -> [n, Q] -> [k, n, Q], regrouped to
     EP-rank order [n, k, Q] = [P, Q]. With the group inside one node it is one all-gather.
  2. every row of x_sorted[N,H] (this rank's own tokens, grouped by GLOBAL expert id) goes through
     its expert with the existing GroupedExperts computation on the full weights.
  3. backward: the full weights' gradients [P, Q] are reduce-scattered back along the same path,
     inside the node first (so each node sends one node-sum per remote block), then across nodes to
     the owner. The owner's gradient is the sum over its EP group's tokens: the gradient token
     dispatch leaves on it (up to fp32 summation order).

Router, capacity, losses and statistics live in the MoE layer and are untouched.

Pre-fetch: the experts of the next MoE layer of this stage start to move while the current layer
computes (async collectives; on CUDA the packing and the second level run on a side stream), so a
layer only waits for what has not arrived yet. A fetch is consumed in the same forward pass that
starts it (weights never change in between). Recomputation in backward fetches synchronously.
The full weights live until the layer's backward has used them (autograd keeps them), then go.

Bytes: ``CommCounter`` counts what each rank sends in these collectives, split intra-/inter-node,
with the ring algorithms' convention (an all-gather or reduce-scatter over g ranks of blocks of b
bytes sends (g-1)*b per rank): the figures hpframe/plan/fetch.py predicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Function
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from hpframe.models.moe import GroupedExperts, in_backward
from hpframe.parallel.expert import ExpertParallelExperts, _KeepInGraph

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name where it exists
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class CommCounter:
    """Bytes this rank sent in the expert fetches and gradient returns, by link."""

    intra: int = 0
    inter: int = 0
    calls: int = 0
    prefetched: int = 0
    """Fetches started by the previous MoE layer (ahead of use) rather than by their own layer."""

    def add(self, nbytes: int, inter: bool) -> None:
        if inter:
            self.inter += nbytes
        else:
            self.intra += nbytes
        self.calls += 1


@dataclass(frozen=True, eq=False)
class FetchGroups:
    """The groups one rank's fetches run on: ``inter`` (n ranks, same node position, one per node)
    and ``intra`` (the k ranks of its node), either None when that level has one rank."""

    nodes: int
    per_node: int
    inter: Any | None
    intra: Any | None
    counter: CommCounter = field(default_factory=CommCounter)
    streams: dict[str, Any] = field(default_factory=dict)
    """CUDA: the one side stream all fetches of this rank run on (made on first use)."""


def ep_node_blocks(plan: Any, ep_ranks: tuple[int, ...]) -> tuple[int, int]:
    """(n, k) for one EP group: n nodes of k consecutive EP ranks each; ValueError otherwise."""
    nodes = [plan.ranks.node_of(r) for r in ep_ranks]
    order = list(dict.fromkeys(nodes))
    n = len(order)
    k = len(ep_ranks) // n
    if n * k != len(ep_ranks) or nodes != [m for m in order for _ in range(k)]:
        raise ValueError(f"moe.dispatch=experts needs each EP group's ranks in equal consecutive blocks per node; "
                         f"EP group {ep_ranks} lies on nodes {nodes}")
    return n, k


def build_fetch_groups(plan: Any, groups: Any) -> FetchGroups:
    """The intra-/inter-node subgroups of this rank's EP group (collective: every rank calls it).

    Every rank creates the subgroups of every EP group, in the plan's order (``new_group`` is
    collective over the world); a level with one rank per group is None.
    """
    mine_ep = tuple(groups.ranks["ep"])
    n, k = ep_node_blocks(plan, mine_ep)
    if n == 1:
        return FetchGroups(1, k, None, groups.ep)
    if k == 1:
        return FetchGroups(n, 1, groups.ep, None)
    inter = intra = None
    for g in plan.ranks.groups("ep"):
        g = tuple(g)
        ep_node_blocks(plan, g)
        for m in range(n):
            pg = dist.new_group(list(g[m * k:(m + 1) * k]))
            if groups.rank in g[m * k:(m + 1) * k]:
                intra = pg
        for j in range(k):
            pg = dist.new_group(list(g[j::k]))
            if groups.rank in g[j::k]:
                inter = pg
    assert inter is not None and intra is not None
    return FetchGroups(n, k, inter, intra)


def _all_gather(x: torch.Tensor, group: Any, size: int, counter: CommCounter, inter: bool,
                async_op: bool = False) -> tuple[torch.Tensor, Any]:
    out = x.new_empty((size * x.shape[0], *x.shape[1:]))
    work = _ALL_GATHER(out, x, group=group, async_op=async_op)
    counter.add((size - 1) * x.numel() * x.element_size(), inter)
    return out, work


def _reduce_scatter(x: torch.Tensor, group: Any, size: int, counter: CommCounter, inter: bool) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // size, *x.shape[1:]))
    _REDUCE_SCATTER(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group)
    counter.add((size - 1) * out.numel() * out.element_size(), inter)
    return out


class _Fetch:
    """One in-flight fetch of a layer's experts: ``start`` issues it, ``result`` completes it.

    Gloo: the cross-node level runs asynchronously from ``start``; the in-node level (it needs the
    first level's output) runs in ``result``. CUDA: both levels are issued from ``start`` on a side
    stream, ``result`` makes the current stream wait for them.
    """

    def __init__(self, module: ExpertFetchExperts) -> None:
        self.module = module
        fg = module.fetch_groups
        self.stream = None
        if module.w2.is_cuda:
            if "side" not in fg.streams:
                fg.streams["side"] = torch.cuda.Stream(device=module.w2.device)
            self.stream = fg.streams["side"]
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self._issue(fg)
        else:
            self._issue(fg)

    def _issue(self, fg: FetchGroups) -> None:
        flat = self.module.packed_local()  # [1, Q]
        self.send = flat  # alive until the collective that reads it has completed
        self.buf, self.work, self.level2_pending = flat, None, False
        if fg.inter is not None:
            self.buf, self.work = _all_gather(flat, fg.inter, fg.nodes, fg.counter, True, async_op=True)  # [n, Q]
            self.level2_pending = fg.intra is not None
            if self.level2_pending and self.stream is not None:
                self.work.wait()  # the side stream waits; the host does not
                self.buf, self.work = _all_gather(self.buf, fg.intra, fg.per_node, fg.counter, False, async_op=True)
                self.level2_pending = False
        elif fg.intra is not None:
            self.buf, self.work = _all_gather(flat, fg.intra, fg.per_node, fg.counter, False, async_op=True)  # [k, Q]

    def result(self) -> torch.Tensor:
        """The full packed weights [P, Q] in EP-rank order."""
        fg = self.module.fetch_groups
        if self.work is not None:
            self.work.wait()
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
            self.buf.record_stream(torch.cuda.current_stream())
        buf = self.buf
        if self.level2_pending:
            buf, _ = _all_gather(buf, fg.intra, fg.per_node, fg.counter, False)  # [k*n, Q]
        if fg.nodes > 1 and fg.per_node > 1:  # (j, m) order -> EP rank m*k + j
            buf = buf.view(fg.per_node, fg.nodes, -1).transpose(0, 1).reshape(fg.nodes * fg.per_node, -1)
        return buf


def return_gradients(g_full: torch.Tensor, fg: FetchGroups) -> torch.Tensor:
    """[P, Q] gradients of the full weights -> [1, Q] summed over the EP group, on the owner:
    reduced inside the node first, then across nodes."""
    g = g_full
    if fg.nodes > 1 and fg.per_node > 1:  # EP-rank order -> (j, m): each node position's blocks together
        g = g.view(fg.nodes, fg.per_node, -1).transpose(0, 1).reshape(fg.nodes * fg.per_node, -1)
    if fg.intra is not None:
        g = _reduce_scatter(g, fg.intra, fg.per_node, fg.counter, False)  # [n, Q]
    if fg.inter is not None:
        g = _reduce_scatter(g, fg.inter, fg.nodes, fg.counter, True)  # [1, Q]
    return g


class _FetchedWeights(Function):
    """Forward: the fetched full weights (already gathered in ``box``); backward: their gradients
    returned to the owners (``return_gradients``), as the gradients of the local blocks."""

    @staticmethod
    def forward(ctx: Any, box: dict[str, Any], *local: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.box_module = box["module"]
        full = box.pop("full")  # [P, Q]; the box keeps no reference past this call
        return tuple(ctx.box_module.unpack(full, local_shape=False))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        mod = ctx.box_module
        parts = [torch.zeros(s, dtype=mod.w2.dtype, device=mod.w2.device) if g is None else g
                 for g, s in zip(grads, mod.full_shapes())]
        g_full = torch.cat([p.reshape(mod.ep_size, -1) for p in parts], dim=1)  # [P, Q]
        g_local = return_gradients(g_full, mod.fetch_groups)
        return (None, *mod.unpack(g_local, local_shape=True))


class ExpertFetchExperts(ExpertParallelExperts):
    """This EP rank's expert slice; its forward fetches the others' and computes its own tokens."""

    def __init__(self, experts: GroupedExperts, *, global_expert_ids: range, ep_group: Any, ep_size: int,
                 fetch_groups: FetchGroups, overlap: bool = True) -> None:
        super().__init__(experts, global_expert_ids=global_expert_ids, ep_group=ep_group, ep_size=ep_size,
                         overlap=overlap)
        self.fetch_groups = fetch_groups
        self.next_fetch: ExpertFetchExperts | None = None  # the next MoE layer of this stage (pre-fetch)
        self._pending: _Fetch | None = None
        with torch.device("meta"):  # the computation's template: full-size parameter slots, no storage
            self._template = [GroupedExperts(self.num_global_experts, self.hidden, self.inner, self.activation)]
        self._template[0].impl = self.impl

    def _names(self) -> list[str]:
        return ["w13", "w2"] if self.swiglu else ["w1", "w2"]

    def full_shapes(self) -> list[tuple[int, ...]]:
        return [(self.num_global_experts, *getattr(self, n).shape[1:]) for n in self._names()]

    def packed_local(self) -> torch.Tensor:
        """This rank's expert block as one row [1, Q] (w13 or w1, then w2), detached."""
        return torch.cat([getattr(self, n).detach().reshape(1, -1) for n in self._names()], dim=1)

    def unpack(self, packed: torch.Tensor, *, local_shape: bool) -> list[torch.Tensor]:
        """[rows, Q] -> the weights in full [E, ...] (rows = P) or local [L, ...] (rows = 1) shape."""
        out, start = [], 0
        for n in self._names():
            w = getattr(self, n)
            q = w.numel()
            part = packed[:, start:start + q]
            out.append(part.reshape(w.shape) if local_shape else part.reshape(self.num_global_experts, *w.shape[1:]))
            start += q
        return out

    def prefetch(self) -> None:
        """Start fetching this layer's experts now (no-op when one is already in flight)."""
        if self._pending is None:
            self._pending = _Fetch(self)

    def _fetched(self) -> torch.Tensor:
        pending, self._pending = self._pending, None
        if pending is None or in_backward():
            if pending is not None:  # never expected: a pre-fetch left over; complete it, then fetch afresh
                pending.result()
            pending = _Fetch(self)
        return pending.result()

    def forward_with_side(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor,
                          side: Any | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y_sorted[N,H], side() or None); ``side`` (the shared experts) runs while the fetch is in
        flight when ``overlap`` is on."""
        if num_tokens_per_expert.numel() != self.num_global_experts:
            raise ValueError(f"got {num_tokens_per_expert.numel()} expert counts, expected {self.num_global_experts} (global)")
        if self._pending is None and not in_backward():
            self.prefetch()
        side_out = side() if side is not None and self.overlap else None
        box = {"module": self, "full": self._fetched()}
        if self.next_fetch is not None and not in_backward() and self.next_fetch._pending is None:
            self.next_fetch.prefetch()  # moves while this layer computes
            self.fetch_groups.counter.prefetched += 1
        local = [getattr(self, n) for n in self._names()]
        weights = _FetchedWeights.apply(box, *local) if torch.is_grad_enabled() \
            else self.unpack(box.pop("full"), local_shape=False)
        if side is not None and not self.overlap:
            side_out = side()
        params = dict(zip(self._names(), weights))
        self._template[0].impl = self.impl  # whatever impl this module was given since
        if x.shape[0] == 0:
            y = x.new_zeros(0, self.hidden)
            return (_KeepInGraph.apply(y, *weights) if torch.is_grad_enabled() else y), side_out
        counts = num_tokens_per_expert
        if self.checkpoint_compute and torch.is_grad_enabled():
            y = checkpoint(self._compute, x, counts, *weights, use_reentrant=False)
        else:
            y = functional_call(self._template[0], params, (x, counts))
        return y, side_out

    def _compute(self, x: torch.Tensor, counts: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return functional_call(self._template[0], dict(zip(self._names(), weights)), (x, counts))

    def extra_repr(self) -> str:
        fg = self.fetch_groups
        return super().extra_repr() + f", dispatch=experts (fetch over {fg.nodes} node(s) x {fg.per_node})"


def apply_fetch_moe(moe: nn.Module, plan: Any, groups: Any, fetch_groups: FetchGroups, *, overlap: bool = True) -> None:
    """Replace the experts of one MoE layer by this EP rank's ExpertFetchExperts (in place)."""
    if plan.experts is None:
        raise ValueError(f"parallel.ep={plan.ep} needs a model with experts (moe.num_experts > 0)")
    moe.experts = ExpertFetchExperts(moe.experts, global_expert_ids=plan.experts.local_experts(groups.ep_rank),
                                     ep_group=groups.ep, ep_size=groups.ep_size, fetch_groups=fetch_groups,
                                     overlap=overlap)


def link_prefetch(model: nn.Module, plan: Any, rank: int) -> list[ExpertFetchExperts]:
    """Point each fetching layer of ``rank``'s pipeline stage at the next one (block order; blocks of
    other stages never run here); return them in order."""
    stage = plan.pipeline.stages[plan.ranks.coords(rank)["pp"]]
    mods = [model.layers[i].mlp.experts for i in stage.layers
            if isinstance(getattr(model.layers[i].mlp, "experts", None), ExpertFetchExperts)]
    for cur, nxt in zip(mods, [*mods[1:], None]):
        object.__setattr__(cur, "next_fetch", nxt)  # a plain reference, not a submodule
    return mods


def apply_fetch(model: nn.Module, plan: Any, groups: Any, *, overlap: bool = True) -> FetchGroups:
    """Make every MoE layer of ``model`` fetch experts instead of sending tokens; return the groups
    (whose ``counter`` holds the bytes sent). Collective: every rank calls it."""
    fg = build_fetch_groups(plan, groups)
    for moe in model.moe_modules():
        apply_fetch_moe(moe, plan, groups, fg, overlap=overlap)
    link_prefetch(model, plan, groups.rank)
    return fg
