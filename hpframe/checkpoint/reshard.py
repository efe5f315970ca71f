"""Between an engine's local shards and the portable format's logical tensors, in any layout.

``capture(engine)`` (collective over the engine's groups, every rank calls it in the same order):
for each local parameter, in module order,
  1. the full fp32 master value and Adam moments of this rank's local tensor:
       ZeRO 1/2  the fragments of the flat master partitions of DeepSpeed's ZeRO optimizer or, for bf16
                 with fp32 master weights under ZeRO 1, its BF16_Optimizer (the lp->hp fragment map),
                 all-reduced over the parameter's data-parallel group (dp for dense weights, edp for
                 experts), as DeepSpeed's ``safe_get_full_fp32_param`` does (see ``_full_hp``)
       ZeRO 0    the parameter itself and the client AdamW's ``state[param]``
  2. TP-sharded tensors (``tensor_model_parallel``, ``partition_dim``) all-gathered over tp (rank order
     = chunk order: ``torch.chunk`` is how ``parallel/tensor.py`` split them)
  3. kept (cloned to host memory) only by the rank that writes it: tp == 0 and dp == 0 for dense
     tensors, tp == 0 and edp == 0 for routed experts (which are written as their global-id rows);
     the pipeline's second copy of a tied embedding is never written.
Persistent buffers (the aux-loss-free router bias ``expert_bias``) are replicated and written like
dense parameters.

``restore(engine, ckpt)`` (no communication): every rank reads the logical tensors it needs from the
files (only its experts' rows), slices its TP chunk and sets the model weight, ZeRO's fp32 partition
(``safe_set_full_fp32_param``) and the Adam state. Any saved layout loads into any layout of the same
model; ``PortableCheckpoint.check_compatible`` refuses a different model before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from hpframe.checkpoint.portable import Piece, PortableCheckpoint, RankPart
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
        raise ValueError(f"checkpointing supports ZeRO stages 0-2 with DeepSpeed's ZeRO or BF16 optimizer, "
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


def _full_hp(zo: Any, p: torch.Tensor, key: str | None) -> torch.Tensor:
    """The full fp32 master value (key None) or Adam moment of ``p`` from ZeRO's flat partitions.

    DeepSpeed's ``safe_get_full_optimizer_state`` reads per-parameter fragments that its ZeRO-1/2
    optimizer links after the first step of the FIRST param group only, so the moments of later groups
    (our no-decay group) are missing there; this reads the inner optimizer's flat state directly, with
    the same fragment addresses and the same all-reduce over the parameter's data-parallel group.
    """
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)  # [numel] of the local tensor
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is not None:
        flat = _flat_partitions(zo)[mapping.param_group_index]
        src = flat if key is None else zo.optimizer.state.get(flat, {}).get(key)
        if src is not None:
            hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
            buf.narrow(0, lp.start, lp.numel).copy_(src.detach().narrow(0, hp.start, hp.numel))
    dist.all_reduce(buf, group=p._dp_group)
    return buf.view(p.shape)


def _full_local(engine: Any, t: LocalTensor, with_moments: bool) -> dict[str, torch.Tensor]:
    """This rank's local tensor as fp32 (ZeRO partitions assembled), with its Adam moments."""
    if not t.is_param:
        return {"param": t.tensor.detach().float()}
    zo = _zero_optimizer(engine)
    if zo is not None and hasattr(t.tensor, "_dp_group"):
        keys = (None, *MOMENTS) if with_moments else (None,)
        return {k or "param": _full_hp(zo, t.tensor, k) for k in keys}
    out = {"param": t.tensor.detach().float()}
    if with_moments:
        state = engine.optimizer.state.get(t.tensor, {})
        for k in MOMENTS:
            if k in state:
                out[k] = state[k].detach().float()
    return out


def _gather_tp(x: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    """Concatenate the tp ranks' chunks along ``dim`` (rank order)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def capture(engine: Any) -> RankPart:
    """This rank's part of a portable checkpoint: host copies of the tensors it writes (collective)."""
    engine.optimizer.wait_for_update()
    plan, rank = engine.plan, dist.get_rank()
    coords = plan.ranks.coords(rank)
    with_moments = _has_adam_state(engine)
    adam_step = _adam_step(engine)
    part = RankPart(rank=rank, coords=dict(coords))
    with torch.no_grad():
        for t in local_tensors(engine):
            values = _full_local(engine, t, with_moments)
            if t.tp_dim is not None and plan.tp > 1:
                values = {k: _gather_tp(v, engine.groups.tp, t.tp_dim) for k, v in values.items()}
            writer = coords["tp"] == 0 and (coords["edp"] == 0 if t.rows is not None else coords["dp"] == 0)
            if not writer or t.duplicate:
                continue
            full_shape = tuple(values["param"].shape)
            if t.rows is not None:
                full_shape = (_num_global(engine), *full_shape[1:])
            for kind, v in values.items():
                part.pieces.append(Piece(t.name, kind, v.detach().to("cpu", copy=True), full_shape, t.rows))
            if t.is_param and adam_step is not None and "exp_avg" in values:
                part.adam_step[t.name] = adam_step
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
        raise ValueError(f"{t.name}: the checkpoint slice for local {t.local_name} has shape {tuple(full.shape)}, "
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
        for gi, bufs in moments.items():
            flat = _flat_partitions(zo)[gi]
            zo.optimizer.state[flat] = {"step": adam_step_tensor(saved_step, flat.device), **bufs}
        zo._hp_optimizer_states_linked = False  # re-point the per-parameter fragments at the new buffers
        if moments:
            zo._lazy_init_hp_params_optimizer_state()

