"""Between an engine's local shards and the portable format's logical tensors, in any layout.

``capture(engine)`` (no communication: every rank writes what it holds, in parallel): for each local
parameter, in module order, this rank's share of
  ZeRO 1/2  its fragment of the flat fp32 master partition of DeepSpeed's ZeRO optimizer or, for bf16
            with fp32 master weights under ZeRO 1, of its BF16_Optimizer (``_hp_mapping``: which
            elements of the local tensor this rank's partition holds), with the Adam moments of the
            same elements; the fragments of the parameter's data-parallel group (dp for dense weights,
            edp for experts) are disjoint and cover it
  ZeRO 0    the parameter and the client AdamW's ``state[param]``, replicated over the data-parallel
            group: each of its ranks writes an equal contiguous share of the flattening
as one piece whose box is the local tensor in the single-device model (routed experts: their global-id
rows; TP-sharded tensors: this tp rank's chunk, ``torch.chunk`` order as ``parallel/tensor.py`` split
them). Tensors replicated over tp are written by tp rank 0; the pipeline's second copy of a tied
embedding is never written. Persistent buffers (the aux-loss-free router bias ``expert_bias``) are
replicated and written whole by dp rank 0, tp rank 0 of their stage. Nothing is gathered: a rank's
host memory holds its own share only, so it does not grow with dp.

``restore(engine, ckpt)`` (no communication beyond one all_gather of shapes): every rank reads the
logical tensors it needs from the files (only its experts' rows), slices its TP chunk and sets the
model weight, ZeRO's fp32 partition (``safe_set_full_fp32_param``) and the Adam state. Any saved layout
loads into any layout of the same model; ``PortableCheckpoint.check_compatible`` refuses a different
model before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from hpframe.checkpoint import host_copy
from hpframe.checkpoint.portable import Piece, PortableCheckpoint, RankPart
from hpframe.errors import UserError
from hpframe.models.moe import GroupedExperts

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class LocalTensor:
    """One local parameter or buffer and where it sits in the single-device model."""

    local_name: str
    name: str  # single-device (logical) name
    tensor: torch.Tensor
    is_param: bool
    tp_dim: int | None  # partition dim when TP-sharded
    rows: tuple[int, int] | None  # global expert ids [first, last) for routed experts
    duplicate: bool  # the last pipeline stage's copy of a tied embedding


def logical_name(local: str, num_layers: int, pipelined: bool) -> tuple[str, bool]:
    """(single-device name, is the tied-embedding duplicate) of a local name.

    Pipeline layer list: 0 = embedding, 1..L = blocks, L+1 = final norm and head (``parallel/pipeline.py``).
    """
    if not pipelined:
        return local, False
    head, rest = local.split(".", 1)
    i = int(head)
    if i == 0:
        return rest, False  # embed.weight
    if i == num_layers + 1:
        if rest.startswith("tied."):
            return "embed." + rest.removeprefix("tied."), True
        return rest, False  # norm.weight, head.weight
    return f"layers.{i - 1}.{rest.removeprefix('block.')}", False


def local_tensors(engine: Any) -> Iterator[LocalTensor]:
    """Every parameter and persistent buffer of the engine's module, in module order."""
    engine.optimizer.wait_for_update()  # an update still queued on a side stream (train.overlap_optimizer)
    module: nn.Module = engine.module
    pipelined = engine.plan.pp > 1
    num_layers = _num_layers(engine)
    expert_rows: dict[str, tuple[int, int]] = {}
    for mod_name, mod in module.named_modules():
        if isinstance(mod, GroupedExperts):
            ids = getattr(mod, "global_expert_ids", range(mod.num_experts))
            for n, _ in mod.named_parameters(recurse=False):
                expert_rows[f"{mod_name}.{n}" if mod_name else n] = (ids.start, ids.stop)
    persistent = set(module.state_dict().keys())
    for local, p in module.named_parameters():
        name, dup = logical_name(local, num_layers, pipelined)
        tp_dim = int(getattr(p, "partition_dim", 0)) if getattr(p, "tensor_model_parallel", False) else None
        yield LocalTensor(local, name, p, True, tp_dim, expert_rows.get(local), dup)
    for local, b in module.named_buffers():
        if local in persistent:
            name, dup = logical_name(local, num_layers, pipelined)
            yield LocalTensor(local, name, b, False, None, None, dup)


def _num_layers(engine: Any) -> int:
    stages = engine.plan.pipeline.stages
    return sum(len(s.layers) for s in stages)


def _zero_optimizer(engine: Any) -> Any | None:
    """DeepSpeed's partitioned optimizer wrapper (ZeRO-1/2, or BF16_Optimizer under bf16 ZeRO-1), or
    None under ZeRO 0 (the client AdamW holds the state of the parameters themselves)."""
    if engine.ds.zero_optimization_stage() == 0:
        return None
    zo = engine.ds.optimizer
    if _flat_partitions(zo) is None:
        raise UserError(f"checkpointing supports ZeRO stages 0-2 with DeepSpeed's ZeRO or BF16 optimizer, "
                         f"got {type(zo).__name__}")
    return zo


def _flat_partitions(zo: Any) -> list[torch.Tensor] | None:
    """The flat master partitions (one per param group) the inner optimizer steps on: ZeRO's
    ``single_partition_of_fp32_groups`` (fp32, or bf16 with bf16 master weights), BF16_Optimizer's
    ``fp32_groups_flat_partition``. Both map parameters to fragments through ``_hp_mapping``."""
    for attr in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(zo, attr, None)
        if flats is not None:
            return flats
    return None


def _has_adam_state(engine: Any) -> bool:
    zo = _zero_optimizer(engine)
    opt = zo.optimizer if zo is not None else engine.optimizer
    return any("exp_avg" in s for s in opt.state.values())


def _adam_step(engine: Any) -> float | None:
    """The Adam step count of this rank's optimizer (None before the first step).

    Every parameter shares it: a skipped step skips the whole optimizer (``SkippableAdamW``). Under
    ZeRO a rank holds Adam state only for its partition, so the count is read from any group's state.
    """
    zo = _zero_optimizer(engine)
    opt = zo.optimizer if zo is not None else engine.optimizer
    steps = {float(s["step"]) for s in opt.state.values() if "step" in s}
    assert len(steps) <= 1, f"parameters at different Adam steps: {sorted(steps)}"
    return steps.pop() if steps else None


Share = tuple[tuple[int, int], dict[str, torch.Tensor]]


def _zero_share(zo: Any, p: torch.Tensor, with_moments: bool) -> Share | None:
    """This rank's ZeRO fragment of ``p``: (flat [lo, hi) of the local tensor, {kind: 1-D values}), or None."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:  # none of p is in this rank's partition
        return None
    flat = _flat_partitions(zo)[mapping.param_group_index]
    hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
    out = {"param": flat.detach().narrow(0, hp.start, hp.numel)}
    if with_moments:
        state = zo.optimizer.state.get(flat, {})
        out.update({k: state[k].detach().narrow(0, hp.start, hp.numel) for k in MOMENTS if k in state})
    return (lp.start, lp.start + lp.numel), out


def _replicated_share(engine: Any, t: LocalTensor, with_moments: bool, coords: dict[str, int]) -> Share | None:
    """A tensor every rank of its data-parallel group holds whole (ZeRO 0, buffers): an equal contiguous
    share of its flattening per rank of that group (buffers: all of it, by dp rank 0)."""
    plan = engine.plan
    if not t.is_param:
        return ((0, t.tensor.numel()), {"param": t.tensor.detach().reshape(-1)}) if coords["dp"] == 0 else None
    axis, size = ("edp", plan.ranks.edp) if t.rows is not None else ("dp", plan.dp)
    i, n = coords[axis], t.tensor.numel()
    lo, hi = i * n // size, (i + 1) * n // size
    values = {"param": t.tensor.detach()}
    if with_moments:
        state = engine.optimizer.state.get(t.tensor, {})
        values.update({k: state[k].detach() for k in MOMENTS if k in state})
    return (lo, hi), {k: v.reshape(-1)[lo:hi] for k, v in values.items()}


def capture(engine: Any) -> RankPart:
    """This rank's part of a portable checkpoint: host copies of its own shares (no communication).

    On CUDA the copies are only enqueued, on a side stream (``host_copy``): the part's ``copied`` event
    marks them done, readers call ``part.wait_copied()``, and the optimizer's next update waits for them.
    """
    engine.optimizer.wait_for_update()
    plan, rank = engine.plan, dist.get_rank()
    coords = plan.ranks.coords(rank)
    with_moments = _has_adam_state(engine)
    adam_step = _adam_step(engine)
    zo = _zero_optimizer(engine)
    part = RankPart(rank=rank, coords=dict(coords))
    device = next(engine.ds.module.parameters()).device
    copies = host_copy.HostCopies(device) if device.type == "cuda" and host_copy.enabled() else None
    pending: list[Piece] = []  # pieces whose tensor the side stream fills
    with torch.no_grad():
        for t in local_tensors(engine):
            split = t.tp_dim is not None and plan.tp > 1
            if t.duplicate or (coords["tp"] != 0 and not split):
                continue
            zero = zo is not None and t.is_param and hasattr(t.tensor, "_dp_group")
            share = _zero_share(zo, t.tensor, with_moments) if zero else _replicated_share(engine, t, with_moments, coords)
            if share is None or share[0][0] >= share[0][1]:
                continue
            span, values = share
            full = list(t.tensor.shape)
            if split:
                full[t.tp_dim] *= plan.tp
            if t.rows is not None:
                full[0] = _num_global(engine)
            whole = span == (0, t.tensor.numel())
            for kind, v in values.items():
                src = v.view(t.tensor.shape) if whole else v
                piece = Piece(t.name, kind, src, tuple(full), t.rows,
                              (t.tp_dim, coords["tp"], plan.tp) if split else None, None if whole else span)
                if copies is not None:
                    copies.add(src.detach())
                    pending.append(piece)
                else:
                    piece.tensor = src.to("cpu", torch.float32, copy=True)
                part.pieces.append(piece)
            if t.is_param and adam_step is not None and "exp_avg" in values:
                part.adam_step[t.name] = adam_step
    if copies is not None:
        hosts, part.copied = copies.run(owner=part)
        for piece, host in zip(pending, hosts):
            piece.tensor = host
        engine.optimizer.hold_until(part.copied)
    return part


def _num_global(engine: Any) -> int:
    assert engine.plan.experts is not None
    return int(engine.plan.experts.num_experts)


def expected_shapes(engine: Any) -> dict[str, tuple[int, ...]]:
    """Full single-device shape of every logical tensor this rank holds (no communication)."""
    plan = engine.plan
    out: dict[str, tuple[int, ...]] = {}
    for t in local_tensors(engine):
        shape = list(t.tensor.shape)
        if t.tp_dim is not None:
            shape[t.tp_dim] *= plan.tp
        if t.rows is not None:
            shape[0] = _num_global(engine)
        out[t.name] = tuple(shape)
    return out


def _local_slice(engine: Any, t: LocalTensor, full: torch.Tensor) -> torch.Tensor:
    if t.tp_dim is not None and engine.plan.tp > 1:
        full = full.chunk(engine.plan.tp, dim=t.tp_dim)[engine.plan.ranks.coords(dist.get_rank())["tp"]]
    if tuple(full.shape) != tuple(t.tensor.shape):
        raise UserError(f"{t.name}: the checkpoint slice for local {t.local_name} has shape {tuple(full.shape)}, "
                         f"the model holds {tuple(t.tensor.shape)}")
    return full


def adam_step_tensor(step: float, device: torch.device) -> torch.Tensor:
    """The Adam step count as the optimizers create it: a 0-dim fp32 tensor on the parameters' device.

    The update is always torch's fused AdamW or hpframe's kernel (``engine/build.py``: ``fused=True``),
    both of which read ``state_steps`` on the device of the parameters; a CPU count fails the first
    step after a resume on CUDA."""
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def restore(engine: Any, ckpt: PortableCheckpoint) -> None:
    """Load weights, fp32 master weights and Adam state of this rank from ``ckpt`` (any saved layout)."""
    from deepspeed.utils import safe_set_full_fp32_param

    # the whole model's tensors (pipeline stages hold different ones): a checkpoint tensor that no rank
    # of this model holds is "unexpected", so the check sees the union over ranks
    mine = expected_shapes(engine)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    ckpt.check_compatible({k: v for shapes in everyone for k, v in shapes.items()})
    zo = _zero_optimizer(engine)
    # ZeRO: one flat Adam buffer per param group, filled fragment by fragment below (padding stays 0)
    saved_step = max(ckpt.adam_step.values(), default=None)
    moments: dict[int, dict[str, torch.Tensor]] = {}
    if zo is not None and saved_step is not None:
        moments = {gi: {k: torch.zeros_like(flat) for k in MOMENTS} for gi, flat in enumerate(_flat_partitions(zo))}
    with torch.no_grad():
        for t in local_tensors(engine):
            value = _local_slice(engine, t, ckpt.read(t.name, "param", t.rows))
            t.tensor.data.copy_(value.to(t.tensor.dtype))
            if not t.is_param:
                continue
            has_moments = all(ckpt.has(t.name, k) for k in MOMENTS)
            step = ckpt.adam_step.get(t.name)
            if zo is not None:
                mapping = getattr(t.tensor, "_hp_mapping", None)
                safe_set_full_fp32_param(t.tensor, value.float())
                if mapping is None or not has_moments:
                    continue
                bufs = moments[mapping.param_group_index]
                hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
                for k in MOMENTS:
                    src = _local_slice(engine, t, ckpt.read(t.name, k, t.rows)).float().flatten()
                    bufs[k].narrow(0, hp.start, hp.numel).copy_(src.narrow(0, lp.start, lp.numel))
            elif has_moments:
                state = engine.optimizer.state[t.tensor]
                for k in MOMENTS:
                    state[k] = _local_slice(engine, t, ckpt.read(t.name, k, t.rows)).to(t.tensor.device, t.tensor.dtype, copy=True)
                state["step"] = adam_step_tensor(step if step is not None else saved_step, t.tensor.device)
    if zo is not None:
        install_zero_moments(zo, moments, saved_step)


def install_zero_moments(zo: Any, moments: dict[int, dict[str, torch.Tensor]], step: float | None) -> None:
    """Make ``moments`` ({param group: {kind: flat buffer the size of its master partition}}) the
    Adam state of ZeRO's flat partitions at Adam step ``step``, and re-point the per-parameter
    fragments (``_hp_mapping``) at them."""
    for gi, bufs in moments.items():
        flat = _flat_partitions(zo)[gi]
        zo.optimizer.state[flat] = {"step": adam_step_tensor(step, flat.device), **bufs}
    zo._hp_optimizer_states_linked = False
    if moments:
        zo._lazy_init_hp_params_optimizer_state()

