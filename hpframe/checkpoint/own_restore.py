"""Restore a rank from its own part of a snapshot taken in the same layout (the fast tier's recovery).

``reshard.restore`` assembles every local tensor whole from the parts of all the ranks that wrote it,
so it needs every part of the job on the node. In the layout that took the snapshot (the fast tier
serves no other), a rank's own part already holds its own share of what it owns: its ZeRO fragments
of the master weights and Adam moments, its share of a ZeRO-0 replica. What it does not hold, its
peers' own parts do, and it comes through the groups that training itself communicates over
(collective: every rank calls ``restore_own`` with its own part):

  1. tp       tensors replicated over tp (norms, routers, unsplit experts) are written by tp rank 0
              only (``reshard.capture``); the other ranks of its tp group own the same shares (same dp
              coordinate, same partition layout: checked) and take them by broadcast from tp rank 0
  2. ZeRO 1/2 the share is this rank's fragment: it goes into the master partition
              (``single_partition_of_fp32_groups`` / ``fp32_groups_flat_partition``) and the moments
              into flat Adam buffers, as ``reshard.restore`` sets them
  3. dp       ZeRO 0: the equal shares of the dp group (edp for routed experts) are all-gathered into
              the whole parameter and its moments; persistent buffers (router biases), written whole
              by dp rank 0, are broadcast from it
  4. pp       the tied embedding's copy on the last stage (never written): the first stage assembles
              the whole matrix (a dp all-gather of its shares) and broadcasts it over the embedding group
  5. ZeRO 1/2 the model's weights are rebuilt from the master partitions as after an optimizer step:
              ``update_lp_params`` copies this rank's master partition into its partition of the flat
              low-precision buffer (rounding as ``reshard.restore``'s ``.to(dtype)`` does) and
              all-gathers it over the dp groups (DeepSpeed's ZeRO-1/2 optimizer and BF16_Optimizer alike)

Every value set is the one ``reshard.restore`` sets from the whole snapshot, so resumed training is
the same bit for bit. The shares wait in host memory; the device holds one bucket of at most
``BUCKET_ELEMENTS`` at a time beyond the state being restored (and, under ZeRO 0, one bucket of whole
tensors while they are set).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.distributed as dist

from hpframe.checkpoint.portable import Piece
from hpframe.checkpoint.reshard import (MOMENTS, LocalTensor, _flat_partitions, _zero_optimizer, adam_step_tensor,
                                        install_zero_moments, local_tensors)
from hpframe.errors import UserError

BUCKET_ELEMENTS = 1 << 26
"""Elements per collective (256 MiB of fp32): bounds the device buffers of a restore."""


@dataclass
class _Entry:
    """One local tensor, the share of it this rank's layout owns, and that share's values once known."""

    t: LocalTensor
    zero: bool  # in ZeRO's partitions: the share is this rank's fragment of the master weights
    span: tuple[int, int] | None  # the share: [lo, hi) of the local tensor's flattening (None: empty)
    kinds: tuple[str, ...]
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> 1-D fp32 on the host, hi - lo elements

    @property
    def numel(self) -> int:
        return self.t.tensor.numel()

    @property
    def share_numel(self) -> int:
        """Elements of the share over all kinds (0 when it is empty)."""
        return (self.span[1] - self.span[0]) * len(self.kinds) if self.span is not None else 0

    def stacked(self) -> torch.Tensor:
        """The share's values, kind after kind, flat (on the host)."""
        return torch.cat([self.values[k] for k in self.kinds])


def _buckets(entries: list[_Entry]) -> list[list[_Entry]]:
    """Consecutive runs of ``entries`` of at most BUCKET_ELEMENTS whole-tensor elements (a larger tensor alone)."""
    out: list[list[_Entry]] = []
    size = 0
    for e in entries:
        n = e.numel * len(e.kinds)
        if not out or size + n > BUCKET_ELEMENTS:
            out.append([])
            size = 0
        out[-1].append(e)
        size += n
    return out


def restore_own(engine: Any, layout: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore this rank's weights, master weights, Adam state and buffers from its own part alone.

    ``layout`` is the part's layout document (``portable.layout_doc``), ``tensors`` its safetensors
    content by key; the part must come from this layout (the fast tier takes only snapshots of equal
    plan fingerprint and ``shard_digest`` on every rank).
    Collective over the world; raises UserError on every rank when any rank's part does not fit.
    """
    _OwnRestore(engine, layout).run(tensors)


def shard_digest(engine: Any) -> str:
    """A digest of what ``restore_own`` takes from this rank's layout: its coordinates and, for every
    local tensor, whether ZeRO partitions it, the span of it this rank owns and whether ``capture``
    writes that span here (no communication). Equal digests: a part of one restores into the other."""
    r = _OwnRestore(engine, {})
    entries = [r._entry(t) for t in local_tensors(engine)]
    doc = [r.coords, [(e.t.local_name, e.t.name, e.numel, e.zero, e.span, r._written_here(e)) for e in entries]]
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


class _OwnRestore:
    def __init__(self, engine: Any, layout: dict[str, Any]) -> None:
        self.engine, self.plan, self.layout = engine, engine.plan, layout
        self.rank = dist.get_rank()
        self.coords = self.plan.ranks.coords(self.rank)
        self.device = next(engine.module.parameters()).device
        self.zo = _zero_optimizer(engine)
        self.moments: dict[int, dict[str, torch.Tensor]] = {}  # ZeRO: flat Adam buffers by param group
        self.step = -1.0  # the saved Adam step (-1: no optimizer step taken yet), set by run

    def run(self, tensors: Mapping[str, torch.Tensor]) -> None:
        own_step = max(self.layout.get("adam_step", {}).values(), default=-1.0)
        self.step = self._all_max([own_step])[0]
        entries = [self._entry(t) for t in local_tensors(self.engine)]
        tp_items = [e for e in entries if e.span is not None and not e.t.duplicate and not self._split(e.t)]
        problems = self._own_values(entries, tensors)
        if self.plan.tp > 1:
            problems += self._tp_check(tp_items)
        if self._all_max([float(bool(problems))])[0]:  # every rank raises, none waits in a collective
            raise UserError(f"rank {self.rank}: the fast tier's snapshot part does not fit this layout"
                            + (f": {'; '.join(problems[:5])}" if problems else " on another rank (see its log)"))
        with torch.no_grad():
            if self.zo is not None and self.step >= 0:
                self.moments = {gi: {k: torch.zeros_like(flat) for k in MOMENTS}
                                for gi, flat in enumerate(_flat_partitions(self.zo))}
            if self.plan.tp > 1:
                self._tp_fill(tp_items)
            for e in entries:
                if e.zero and e.values:
                    self._set_fragment(e, e.values)
            self._gather_replicated(entries)
            self._broadcast_buffers(entries)
            self._tied_embedding(entries)
            if self.zo is not None:
                self._rebuild_weights()

    # ---- what this rank owns ----------------------------------------------------------------------
    def _split(self, t: LocalTensor) -> bool:
        return t.tp_dim is not None and self.plan.tp > 1

    def _entry(self, t: LocalTensor) -> _Entry:
        zero = self.zo is not None and t.is_param and hasattr(t.tensor, "_dp_group")
        # moments: ZeRO's of its partitions; outside ZeRO, the client AdamW's state of the parameter
        with_moments = self.step >= 0 and t.is_param and (zero or self.zo is None)
        return _Entry(t, zero, self._span(t, zero), ("param", *MOMENTS) if with_moments else ("param",))

    def _span(self, t: LocalTensor, zero: bool) -> tuple[int, int] | None:
        """The span of ``t`` this rank's layout owns: what ``reshard._zero_share`` (ZeRO fragment) or
        ``reshard._replicated_share`` (equal dp/edp share; buffers whole at dp rank 0) give ``capture``."""
        n = t.tensor.numel()
        if zero:
            mapping = getattr(t.tensor, "_hp_mapping", None)
            if mapping is None:
                return None
            lp = mapping.lp_fragment_address
            lo, hi = lp.start, lp.start + lp.numel
        elif not t.is_param:
            lo, hi = (0, n) if self.coords["dp"] == 0 else (0, 0)
        else:
            axis, size = ("edp", self.plan.ranks.edp) if t.rows is not None else ("dp", self.plan.dp)
            i = self.coords[axis]
            lo, hi = i * n // size, (i + 1) * n // size
        return (lo, hi) if lo < hi else None

    def _written_here(self, e: _Entry) -> bool:
        """Whether ``capture`` put this rank's share of ``e`` into its own part (its rule: tensors
        replicated over tp by tp rank 0 only, the tied embedding's second copy never)."""
        return e.span is not None and not e.t.duplicate and (self.coords["tp"] == 0 or self._split(e.t))

    def _own_values(self, entries: list[_Entry], tensors: Mapping[str, torch.Tensor]) -> list[str]:
        """Fill the shares the own part holds (by the keys ``capture`` gives them); returns what is amiss."""
        coords = {k: int(v) for k, v in self.layout.get("coords", {}).items()}
        if self.layout.get("rank") != self.rank or coords != self.coords:
            return [f"the part of rank {self.layout.get('rank')} at {coords}, this rank is {self.rank} at {self.coords}"]
        problems = []
        for e in entries:
            if not self._written_here(e):
                continue
            assert e.span is not None
            tp = (e.t.tp_dim, self.coords["tp"], self.plan.tp) if self._split(e.t) else None
            flat = None if e.span == (0, e.numel) else e.span
            for kind in e.kinds:
                key = Piece(e.t.name, kind, torch.empty(0), tuple(e.t.tensor.shape), e.t.rows, tp, flat).key
                v = tensors.get(key)
                if v is None or v.numel() != e.span[1] - e.span[0]:
                    problems.append(f"no {key}" if v is None else f"{key} holds {v.numel()} elements")
                    continue
                e.values[kind] = v.reshape(-1).float()
        return problems

    def _all_max(self, values: list[float]) -> list[float]:
        v = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX)
        return v.tolist()

    # ---- 1. tp --------------------------------------------------------------------------------------
    def _tp_src(self) -> int:
        return self.plan.ranks.rank_of(tp=0, pp=self.coords["pp"], dp=self.coords["dp"])

    def _tp_check(self, items: list[_Entry]) -> list[str]:
        """The tp-replicated shares ``items`` are tp rank 0's (a fixed-size digest of the spans, broadcast)."""
        mod = (1 << 61) - 1
        digest = [len(items), sum((i + 1) * e.span[0] for i, e in enumerate(items)) % mod,
                  sum((i + 1) * e.span[1] for i, e in enumerate(items)) % mod]
        mine = torch.tensor(digest, dtype=torch.int64, device=self.device)
        theirs = mine.clone()
        dist.broadcast(theirs, src=self._tp_src(), group=self.engine.groups.tp)
        if not torch.equal(mine, theirs):
            return [f"tp rank 0 owns other shares of the tensors replicated over tp than rank {self.rank}"]
        return []

    def _tp_fill(self, items: list[_Entry]) -> None:
        """Step 1: the shares of the tensors replicated over tp, broadcast from tp rank 0."""
        first = self.coords["tp"] == 0
        for bucket in _buckets(items):
            flat = (torch.cat([e.stacked() for e in bucket]).to(self.device) if first else
                    torch.empty(sum(e.share_numel for e in bucket), device=self.device))
            dist.broadcast(flat, src=self._tp_src(), group=self.engine.groups.tp)
            if first:
                continue
            flat, pos = flat.cpu(), 0
            for e in bucket:
                n = e.span[1] - e.span[0]
                for kind in e.kinds:
                    e.values[kind] = flat[pos:pos + n]
                    pos += n

    # ---- 2. ZeRO fragments, 3. dp -------------------------------------------------------------------
    def _set_fragment(self, e: _Entry, values: Mapping[str, torch.Tensor]) -> None:
        """Step 2: this rank's fragment of ``e`` (values of its lp fragment) into the master partition
        and the Adam buffers (their padding stays 0, as ``reshard.restore`` leaves it)."""
        mapping = e.t.tensor._hp_mapping
        hp, gi = mapping.hp_fragment_address, mapping.param_group_index
        _flat_partitions(self.zo)[gi].narrow(0, hp.start, hp.numel).copy_(values["param"])
        for k in MOMENTS:
            if k in values:
                self.moments[gi][k].narrow(0, hp.start, hp.numel).copy_(values[k])

    def _set_whole(self, e: _Entry, whole: torch.Tensor) -> None:
        """A parameter outside ZeRO's partitions (ZeRO 0): the whole tensor and its client AdamW state."""
        t = e.t.tensor
        rows = whole.view(len(e.kinds), *t.shape)
        t.data.copy_(rows[0].to(t.dtype))
        if len(e.kinds) > 1:
            state = self.engine.optimizer.state[t]
            for i, k in enumerate(e.kinds[1:], start=1):
                state[k] = rows[i].to(t.device, t.dtype, copy=True)
            state["step"] = adam_step_tensor(self.step, t.device)

    def _gather_replicated(self, entries: list[_Entry]) -> None:
        """Step 3 (parameters): each replicated parameter whole, from the shares of its dp (edp) group."""
        groups = self.engine.groups
        for axis, experts in (("dp", False), ("edp", True)):
            items = [e for e in entries
                     if e.t.is_param and not e.zero and not e.t.duplicate and (e.t.rows is not None) == experts]
            for bucket in _buckets(items):
                for e, whole in zip(bucket, gather_shares(bucket, groups.group(axis), groups.size(axis), self.device)):
                    self._set_whole(e, whole)

    def _broadcast_buffers(self, entries: list[_Entry]) -> None:
        """Step 3 (buffers): written whole by dp rank 0 (router biases), broadcast from it over dp."""
        items = [e for e in entries if not e.t.is_param]
        if not items:
            return
        first = self.coords["dp"] == 0
        flat = (torch.cat([e.values["param"] for e in items]).to(self.device) if first else
                torch.empty(sum(e.numel for e in items), device=self.device))
        if self.plan.dp > 1:
            src = self.plan.ranks.rank_of(tp=self.coords["tp"], pp=self.coords["pp"], dp=0)
            dist.broadcast(flat, src=src, group=self.engine.groups.dp)
        pos = 0
        for e in items:
            e.t.tensor.data.copy_(flat[pos:pos + e.numel].view(e.t.tensor.shape).to(e.t.tensor.dtype))
            pos += e.numel

    # ---- 4. pp: the tied embedding, 5. the model's weights ------------------------------------------
    def _tied_embedding(self, entries: list[_Entry]) -> None:
        """Step 4: the last stage's copy of a tied embedding, from the first stage's whole matrix."""
        ties = getattr(self.engine.module, "get_tied_weights_and_groups", lambda: [])()
        if not ties:
            return
        weight, group = ties[0]
        first = self.coords["pp"] == 0
        (e,) = [x for x in entries if x.t.tensor is weight]
        assert e.t.duplicate != first, f"tied {e.t.local_name}: duplicate={e.t.duplicate} on stage {self.coords['pp']}"
        if first and e.zero:
            whole = gather_shares([e], self.engine.groups.dp, self.engine.groups.size("dp"), self.device)[0]
        elif first:  # ZeRO 0: set whole in step 3 (bf16 values round-trip exactly through fp32)
            state = self.engine.optimizer.state.get(e.t.tensor, {})
            whole = torch.cat([e.t.tensor.detach().float().reshape(-1)] +
                              [state[k].float().reshape(-1) for k in e.kinds[1:]])
        else:
            whole = torch.empty(len(e.kinds) * e.numel, device=self.device)
        dist.broadcast(whole, src=self.plan.ranks.rank_of(tp=self.coords["tp"], pp=0, dp=self.coords["dp"]), group=group)
        if first:
            return
        if not e.zero:
            self._set_whole(e, whole)
        elif e.span is not None:
            rows = whole.view(len(e.kinds), -1)
            self._set_fragment(e, {k: rows[i, e.span[0]:e.span[1]] for i, k in enumerate(e.kinds)})

    def _rebuild_weights(self) -> None:
        """Step 5: the Adam buffers become ZeRO's state; the weights are rebuilt from the master partitions."""
        install_zero_moments(self.zo, self.moments, self.step if self.step >= 0 else None)
        # no bf16 partition the last update kernel wrote (bf16_grads._fuse_lp_copy) is current now
        take_written = getattr(self.zo.optimizer, "take_lp_written", None)
        if take_written is not None:
            take_written()
        self.zo.update_lp_params()


def gather_shares(items: list[_Entry], group: Any, size: int, device: torch.device) -> list[torch.Tensor]:
    """The whole of each item, flat, kind after kind ([kinds x numel], on ``device``), assembled from the
    shares the ``size`` members of ``group`` hold (collective over it: two all-gathers, spans then
    values). Every member passes the same tensors; their spans must be disjoint and cover each one."""
    spans = torch.tensor([s for e in items for s in (e.span or (0, 0))], dtype=torch.int64, device=device)
    every = [torch.empty_like(spans) for _ in range(size)]
    dist.all_gather(every, spans, group=group)
    member_spans = [s.view(-1, 2).tolist() for s in every]
    lengths = [sum((hi - lo) * len(e.kinds) for e, (lo, hi) in zip(items, ms)) for ms in member_spans]
    send = torch.zeros(max(lengths), device=device)
    mine = [e.stacked() for e in items if e.span is not None]
    if mine:
        send[:sum(x.numel() for x in mine)] = torch.cat(mine).to(device)
    got = [torch.empty_like(send) for _ in range(size)]
    dist.all_gather(got, send, group=group)
    out = [torch.empty(len(e.kinds), e.numel, device=device) for e in items]
    covered: list[list[tuple[int, int]]] = [[] for _ in items]
    for ms, buf in zip(member_spans, got):
        pos = 0
        for i, (e, (lo, hi)) in enumerate(zip(items, ms)):
            n = (hi - lo) * len(e.kinds)
            if n:
                out[i][:, lo:hi] = buf[pos:pos + n].view(len(e.kinds), hi - lo)
                covered[i].append((lo, hi))
                pos += n
    for e, spans_i in zip(items, covered):
        s = sorted(spans_i)
        if not s or s[0][0] != 0 or s[-1][1] != e.numel or any(a[1] != b[0] for a, b in zip(s, s[1:])):
            raise UserError(f"{e.t.name}: the shares of its group cover {s} of [0, {e.numel})")
    return [x.reshape(-1) for x in out]
