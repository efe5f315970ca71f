"""Restore a rank from its own part of a snapshot taken in the same layout (the fast tier's recovery).

``reshard.restore`` assembles every local tensor whole from the parts of all the ranks that wrote it,
so it needs every part of the job on the node. In the layout that took the snapshot (the fast tier
serves no other), a rank's own part already holds its own share of everything it owns: its ZeRO
fragments of the master weights and Adam moments, its share of a ZeRO-0 replica. What it does not
hold, its peers' own parts do, and it follows through the groups that training itself communicates
over (collective; every rank calls ``restore_own`` with its own part):

  1. tp       tensors replicated over tp (norms, routers, unsplit experts) are written by tp rank 0
              only (``reshard.capture``); the other ranks of its tp group own the same share (same dp
              coordinate, same partition layout: checked) and take it by broadcast from tp rank 0
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
              low-precision buffer (rounding as ``reshard.restore``'s ``.to(dtype)``) and all-gathers
              it over the dp groups (DeepSpeed's ZeRO-1/2 optimizer and BF16_Optimizer alike)

Every value set is the one ``reshard.restore`` sets from the whole snapshot, so resumed training is
the same bit for bit. Nothing is read but the rank's own part; the traffic is within the job's
groups, one model's worth of weights per dp group (what a ZeRO step's all-gather moves), plus the
moments for ZeRO 0 and the tp-replicated shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.distributed as dist

from hpframe.checkpoint.portable import Piece
from hpframe.checkpoint.reshard import (MOMENTS, LocalTensor, _flat_partitions, _zero_optimizer, adam_step_tensor,
                                        install_zero_moments, local_tensors)
from hpframe.errors import UserError

BUCKET_ELEMENTS = 1 << 26
"""Elements per collective (256 MiB of fp32): bounds the temporary buffers of a restore."""


@dataclass
class _Entry:
    """One local tensor, the share of it this rank's layout owns, and its values once known."""

    t: LocalTensor
    zero: bool  # in ZeRO's partitions: the share is this rank's fragment of the master weights
    span: tuple[int, int] | None  # the share: [lo, hi) of the local tensor's flattening (None: empty)
    kinds: tuple[str, ...]
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> 1-D fp32, hi - lo elements
    whole: torch.Tensor | None = None  # ZeRO 0 with pp: the gathered whole (the tied embedding's source)

    @property
    def numel(self) -> int:
        return self.t.tensor.numel()

    def stacked(self) -> torch.Tensor:
        """The share's values, kind after kind, flat."""
        return torch.cat([self.values[k] for k in self.kinds])


def _share_span(plan: Any, t: LocalTensor, zero: bool, coords: dict[str, int]) -> tuple[int, int] | None:
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
        lo, hi = (0, n) if coords["dp"] == 0 else (0, 0)
    else:
        axis, size = ("edp", plan.ranks.edp) if t.rows is not None else ("dp", plan.dp)
        i = coords[axis]
        lo, hi = i * n // size, (i + 1) * n // size
    return (lo, hi) if lo < hi else None


def _entries(engine: Any, zo: Any, coords: dict[str, int], moments: bool) -> list[_Entry]:
    plan = engine.plan
    out = []
    for t in local_tensors(engine):
        zero = zo is not None and t.is_param and hasattr(t.tensor, "_dp_group")
        # moments: ZeRO's are its partitions'; outside ZeRO, the client AdamW's state of the parameter
        with_moments = moments and t.is_param and (zero or zo is None)
        out.append(_Entry(t, zero, _share_span(plan, t, zero, coords), ("param", *MOMENTS) if with_moments else ("param",)))
    return out


def _split(plan: Any, t: LocalTensor) -> bool:
    return t.tp_dim is not None and plan.tp > 1


def _written_here(plan: Any, e: _Entry, coords: dict[str, int]) -> bool:
    """Whether ``capture`` wrote this rank's share of ``e`` into this rank's own part (its rule)."""
    return e.span is not None and not e.t.duplicate and (coords["tp"] == 0 or _split(plan, e.t))


def _piece_key(plan: Any, e: _Entry, kind: str, coords: dict[str, int]) -> str:
    """The safetensors key ``capture`` gives this rank's piece of ``e``."""
    assert e.span is not None
    tp = (e.t.tp_dim, coords["tp"], plan.tp) if _split(plan, e.t) else None
    whole = e.span == (0, e.numel)
    return Piece(e.t.name, kind, torch.empty(0), tuple(e.t.tensor.shape), e.t.rows, tp, None if whole else e.span).key


def _device(engine: Any) -> torch.device:
    return next(engine.module.parameters()).device


def _all_max(values: list[float], device: torch.device) -> list[float]:
    v = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return v.tolist()


def _buckets(entries: list[_Entry]) -> list[list[_Entry]]:
    """Consecutive runs of ``entries`` of at most BUCKET_ELEMENTS whole-tensor elements (one if larger)."""
    out: list[list[_Entry]] = []
    size = BUCKET_ELEMENTS
    for e in entries:
        n = e.numel * len(e.kinds)
        if size + n > BUCKET_ELEMENTS:
            out.append([])
            size = 0
        out[-1].append(e)
        size += n
    return out


def restore_own(engine: Any, layout: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Restore this rank's weights, master weights, Adam state and buffers from its own part alone.

    ``layout`` is the part's layout document (``portable.layout_doc``), ``tensors`` its safetensors
    content by key; the part must come from this layout (the fast tier checks the plan fingerprint).
    Collective over the world; raises UserError on every rank if any rank's part does not match.
    """
    plan, rank = engine.plan, dist.get_rank()
    coords = plan.ranks.coords(rank)
    device = _device(engine)
    zo = _zero_optimizer(engine)
    own_step = max(layout.get("adam_step", {}).values(), default=-1.0)
    saved_step = _all_max([own_step], device)[0]
    entries = _entries(engine, zo, coords, moments=saved_step >= 0)
    tp_items = [e for e in entries if e.span is not None and not e.t.duplicate and not _split(plan, e.t)]
    problems = _load_own_values(engine, entries, layout, tensors, coords, device)
    if plan.tp > 1:
        problems += _tp_check(engine, tp_items, coords, device)
    if _all_max([float(bool(problems))], device)[0]:  # every rank raises, none waits in a collective
        raise UserError(f"rank {rank}: the snapshot's part does not fit this layout"
                        + (f": {'; '.join(problems[:5])}" if problems else " on another rank (see its log)"))
    with torch.no_grad():
        if plan.tp > 1:
            _tp_fill(engine, tp_items, coords, device)
        moments = _set_zero_shares(zo, entries, saved_step)
        _gather_replicated(engine, entries, saved_step, device)
        _broadcast_buffers(engine, entries, coords, device)
        _tied_embedding(engine, zo, entries, moments, coords, device, saved_step)
        if zo is not None:
            install_zero_moments(zo, moments, saved_step if saved_step >= 0 else None)
            # no partition the last update kernel wrote (bf16_grads._fuse_lp_copy) is current now
            take_written = getattr(zo.optimizer, "take_lp_written", None)
            if take_written is not None:
                take_written()
            zo.update_lp_params()


def _load_own_values(engine: Any, entries: list[_Entry], layout: dict[str, Any], tensors: Mapping[str, torch.Tensor],
                     coords: dict[str, int], device: torch.device) -> list[str]:
    """Fill the shares this rank's own part holds; returns what is missing or out of place."""
    plan, rank = engine.plan, dist.get_rank()
    if layout.get("rank") != rank or {k: int(v) for k, v in layout.get("coords", {}).items()} != coords:
        return [f"part of rank {layout.get('rank')} at {layout.get('coords')}, this rank is {rank} at {coords}"]
    problems = []
    for e in entries:
        if not _written_here(plan, e, coords):
            continue
        for kind in e.kinds:
            key = _piece_key(plan, e, kind, coords)
            if key not in tensors:
                problems.append(f"no {key}")
                continue
            v = tensors[key].reshape(-1)
            if v.numel() != e.span[1] - e.span[0]:
                problems.append(f"{key} holds {v.numel()} elements")
                continue
            e.values[kind] = v.to(device, torch.float32)
    return problems


def _tp_check(engine: Any, items: list[_Entry], coords: dict[str, int], device: torch.device) -> list[str]:
    """The shares of the tp-replicated tensors ``items`` are tp rank 0's (broadcast of the spans)."""
    plan = engine.plan
    mod = (1 << 61) - 1  # a fixed-size digest of the spans: the same broadcast on every rank whatever they hold
    digest = [len(items), sum((i + 1) * e.span[0] for i, e in enumerate(items)) % mod,
              sum((i + 1) * e.span[1] for i, e in enumerate(items)) % mod]
    spans = torch.tensor(digest, dtype=torch.int64, device=device)
    theirs = spans.clone()
    dist.broadcast(theirs, src=plan.ranks.rank_of(tp=0, pp=coords["pp"], dp=coords["dp"]), group=engine.groups.tp)
    if not torch.equal(spans, theirs):
        return [f"tp rank 0 owns other shares of the tensors replicated over tp than rank {dist.get_rank()}"]
    return []


def _tp_fill(engine: Any, items: list[_Entry], coords: dict[str, int], device: torch.device) -> None:
    """Step 1: the shares of tensors replicated over tp (``items``), from tp rank 0 of this rank's tp group."""
    plan = engine.plan
    src = plan.ranks.rank_of(tp=0, pp=coords["pp"], dp=coords["dp"])
    group = engine.groups.tp
    for bucket in _buckets(items):
        flat = (torch.cat([e.stacked() for e in bucket]) if coords["tp"] == 0 else
                torch.empty(sum((e.span[1] - e.span[0]) * len(e.kinds) for e in bucket), device=device))
        dist.broadcast(flat, src=src, group=group)
        if coords["tp"] != 0:
            pos = 0
            for e in bucket:
                n = e.span[1] - e.span[0]
                for kind in e.kinds:
                    e.values[kind] = flat[pos:pos + n]
                    pos += n


def _set_zero_shares(zo: Any, entries: list[_Entry], saved_step: float) -> dict[int, dict[str, torch.Tensor]]:
    """Step 2: each ZeRO fragment into its master partition, its moments into flat Adam buffers
    (returned by param group; padding stays 0, as ``reshard.restore`` leaves it)."""
    if zo is None:
        return {}
    flats = _flat_partitions(zo)
    moments = ({gi: {k: torch.zeros_like(flat) for k in MOMENTS} for gi, flat in enumerate(flats)}
               if saved_step >= 0 else {})
    for e in entries:
        if e.zero and e.values:
            _set_fragment(flats, moments, e, {k: v for k, v in e.values.items()})
    return moments


def _set_fragment(flats: list[torch.Tensor], moments: dict[int, dict[str, torch.Tensor]], e: _Entry,
                  values: dict[str, torch.Tensor]) -> None:
    """Write this rank's fragment of ``e`` (values of exactly its lp fragment) into the partitions."""
    mapping = e.t.tensor._hp_mapping
    hp = mapping.hp_fragment_address
    flats[mapping.param_group_index].narrow(0, hp.start, hp.numel).copy_(values["param"])
    for k in MOMENTS:
        if k in values:
            moments[mapping.param_group_index][k].narrow(0, hp.start, hp.numel).copy_(values[k])


def _set_whole(engine: Any, e: _Entry, whole: torch.Tensor, saved_step: float) -> None:
    """A parameter outside ZeRO's partitions (ZeRO 0): the whole tensor and its client AdamW state."""
    t = e.t.tensor
    rows = whole.view(len(e.kinds), *t.shape)
    t.data.copy_(rows[0].to(t.dtype))
    if len(e.kinds) > 1:
        state = engine.optimizer.state[t]
        for i, k in enumerate(e.kinds[1:], start=1):
            state[k] = rows[i].to(t.device, t.dtype, copy=True)
        state["step"] = adam_step_tensor(saved_step, t.device)


def _gather_replicated(engine: Any, entries: list[_Entry], saved_step: float, device: torch.device) -> None:
    """Step 3 (parameters): the whole of each replicated parameter from its group's shares."""
    plan = engine.plan
    for axis, experts in (("dp", False), ("edp", True)):
        items = [e for e in entries if e.t.is_param and not e.zero and not e.t.duplicate and (e.t.rows is not None) == experts]
        for bucket in _buckets(items):
            for e, whole in zip(bucket, gather_shares(bucket, engine.groups.group(axis), engine.groups.size(axis), device)):
                _set_whole(engine, e, whole, saved_step)
                if plan.pp > 1:
                    e.whole = whole  # the tied embedding's first-stage copy (step 4)


def _broadcast_buffers(engine: Any, entries: list[_Entry], coords: dict[str, int], device: torch.device) -> None:
    """Step 3 (buffers): written whole by dp rank 0 (router biases), broadcast from it over dp."""
    plan = engine.plan
    items = [e for e in entries if not e.t.is_param]
    if not items:
        return
    if plan.dp > 1:
        src = plan.ranks.rank_of(tp=coords["tp"], pp=coords["pp"], dp=0)
        flat = (torch.cat([e.values["param"] for e in items]) if coords["dp"] == 0 else
                torch.empty(sum(e.numel for e in items), device=device))
        dist.broadcast(flat, src=src, group=engine.groups.dp)
        pos = 0
        for e in items:
            e.values["param"] = flat[pos:pos + e.numel]
            pos += e.numel
    for e in items:
        e.t.tensor.data.copy_(e.values["param"].view(e.t.tensor.shape).to(e.t.tensor.dtype))


def _tied_embedding(engine: Any, zo: Any, entries: list[_Entry], moments: dict[int, dict[str, torch.Tensor]],
                    coords: dict[str, int], device: torch.device, saved_step: float) -> None:
    """Step 4: the last stage's copy of a tied embedding, from the first stage's whole matrix."""
    ties = engine.module.get_tied_weights_and_groups() if hasattr(engine.module, "get_tied_weights_and_groups") else []
    if not ties:
        return
    weight, group = ties[0]
    plan = engine.plan
    first = coords["pp"] == 0
    (e,) = [x for x in entries if x.t.tensor is weight]
    assert e.t.duplicate != first, f"tied embedding {e.t.local_name}: duplicate={e.t.duplicate} on stage {coords['pp']}"
    if first:
        whole = gather_shares([e], engine.groups.dp, engine.groups.size("dp"), device)[0] if e.zero else e.whole
        assert whole is not None
    else:
        whole = torch.empty(len(e.kinds) * e.numel, device=device)
    dist.broadcast(whole, src=plan.ranks.rank_of(tp=coords["tp"], pp=0, dp=coords["dp"]), group=group)
    if first:
        return
    if e.zero:
        if e.span is not None:
            lo, hi = e.span
            rows = whole.view(len(e.kinds), -1)
            _set_fragment(_flat_partitions(zo), moments, e, {k: rows[i, lo:hi] for i, k in enumerate(e.kinds)})
    else:
        _set_whole(engine, e, whole, saved_step)


def gather_shares(items: list[_Entry], group: Any, size: int, device: torch.device) -> list[torch.Tensor]:
    """The whole of each item, flat, kind after kind ([kinds x numel]), assembled from the shares the
    ``size`` members of ``group`` hold (collective over it: two all-gathers, spans then values). Every
    member passes the same tensors; their spans must be disjoint and cover each tensor."""
    spans = torch.tensor([s for e in items for s in (e.span or (0, 0))], dtype=torch.int64, device=device)
    every = [torch.empty_like(spans) for _ in range(size)]
    dist.all_gather(every, spans, group=group)
    member_spans = [s.view(-1, 2).tolist() for s in every]
    lengths = [sum((hi - lo) * len(e.kinds) for e, (lo, hi) in zip(items, ms)) for ms in member_spans]
    send = torch.zeros(max(lengths), device=device)
    mine = [e.stacked() for e in items if e.span is not None]
    if mine:
        send[:sum(x.numel() for x in mine)] = torch.cat(mine)
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
        ends = sorted(spans_i)
        if not ends or ends[0][0] != 0 or ends[-1][1] != e.numel or any(a[1] != b[0] for a, b in zip(ends, ends[1:])):
            raise UserError(f"{e.t.name}: the shares of its group cover {ends} of [0, {e.numel})")
    return [x.reshape(-1) for x in out]
