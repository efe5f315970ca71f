"""The optimizer-step guard: true global gradient norm, clipping, and skipping non-finite steps.

DeepSpeed's own clipping is switched off (``gradient_clipping: 0`` in the generated config) because
its norm is wrong for some hpframe layouts under ZeRO 0 (pipeline stages, experts, the tied
embedding's second copy; measured in docs/performance.md, section 12). So ``StepGuard`` computes the
norm itself and clips before the optimizer step, for every stage, inside DeepSpeed's
``_take_model_step`` (after the gradients are reduced; docs/design.md, "Library internals"):

  sq(p)  = sum of squared gradient entries this rank holds for p (a ZeRO partition, or the whole grad)
  counted: TP-sharded params (``tensor_model_parallel``) on every tp rank, replicated params on
           tp rank 0 only; the second copy of a tied embedding (last pipeline stage) not at all
  ZeRO 1/2: sum over dp  (dense partitions span dp; expert partitions span edp, and summing
            over dp = edp x ep also adds the distinct experts of the ep ranks)
  ZeRO 0:   expert part summed over ep (distinct experts; edp replicas hold equal grads)
  then:     sum over mp = tp x pp (TP shards and pipeline stages)
  norm = sqrt(total), identical on every rank.

Then, on the device (no host synchronization before the update is queued): a flag ``bad`` (the norm
or any rank's loss not finite, all-reduced with MAX), the clipping coefficient
``min(1, grad_clip / (norm + 1e-6))`` (the formula of ``torch.nn.utils.clip_grad_norm_``; 1 without
clipping), both handed to ``SkippableAdamW``, whose fused kernel divides each gradient by 1/coef as it
reads it and leaves parameters and Adam state untouched when ``bad`` is set (torch's ``grad_scale`` /
``found_inf``, the mechanism of its AMP grad scaler). The norm, the flag and whatever the engine adds
(``report_extra``: losses, balance counts) go to the host in one asynchronous copy queued before the
update; ``finish()`` waits for that copy only, so the host prepares the next step while the GPU runs
the optimizer (host reads before the update left the GPU idle: docs/performance.md, section 7).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from torch import nn

from hpframe.phases import phase


class SkippableAdamW(torch.optim.AdamW):
    """AdamW that takes the guard's verdict for its next ``step`` as device tensors.

    ``control(coef, bad)``: multiply every gradient by ``coef`` (the clipping coefficient) and skip the
    update entirely when ``bad`` is nonzero, both 0-dim tensors that may still be being computed on the
    device. Fused (the default on every device): the kernel divides each gradient by ``1 / coef`` as it
    reads it and returns early on ``bad`` (torch's ``grad_scale`` / ``found_inf``; the step counts are
    put back), so neither clipping nor the decision costs a pass or a host synchronization (a
    separate clipping multiply costs one pass over the gradients). On CUDA with Triton
    the fused update is hpframe's own kernel (``adamw_kernel``: same arithmetic and state as torch's,
    at the memory bandwidth). Unfused, the two scalars are read on the host and applied before torch's
    loop.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._control: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kernel: bool | None = None  # hpframe's Triton AdamW (adamw_kernel.py); decided at the first step
        # overlap_with_forward: the side stream; per unit, its share of every param group; their events
        self._stream: Any = None
        self._unit_groups: list[list[list[nn.Parameter]]] = []
        self._events: list[Any] = []
        # fp32 master partitions whose low-precision copy the kernel writes (engine/bf16_grads.py)
        self.lp_copies: dict[int, torch.Tensor] = {}
        self._lp_written: set[int] = set()
        self._holds: list[Any] = []  # CUDA events the next update waits for (hold_until)

    def take_lp_written(self) -> set[int]:
        """ids of the parameters whose ``lp_copies`` entry the last update wrote; cleared by the call."""
        written, self._lp_written = self._lp_written, set()
        return written

    def overlap_with_forward(self, model: nn.Module) -> int:
        """Run the update on a side stream, unit by unit in the model's forward order, so that the next
        forward starts as soon as its first unit is updated and the rest of the update runs beside it.

        ``model``'s units (``forward_units``) each get a forward pre-hook that makes the current stream
        wait for the event recorded after that unit's parameters were updated, and for nothing else.
        Parameters the units do not cover are updated first and waited for by the model's own hook.
        Results are the same bit for bit: the same kernel updates each tensor with the same inputs.
        Anything else that reads parameters or optimizer state between an update and the next forward
        (checkpoints, evaluation, exports) calls ``wait_for_update`` first. Only the fused Triton path
        overlaps (CUDA); elsewhere the update runs in place as before. Returns the number of units
        (0 when the parameters are not on CUDA).
        """
        params = [p for g in self.param_groups for p in g["params"]]
        if not params or not params[0].is_cuda:
            return 0
        units = forward_units(model)
        mine = {id(p) for p in params}
        seen: set[int] = set()
        owned: list[set[int]] = []  # a parameter shared by two units (a tied weight) belongs to the first
        for _, mod in units:
            ids = {id(p) for p in mod.parameters() if id(p) in mine} - seen
            seen |= ids
            owned.append(ids)
        members = [mine - seen] + owned  # the parameters no unit holds are updated first
        self._unit_groups = [[[p for p in g["params"] if id(p) in ids] for g in self.param_groups] for ids in members]
        self._events = [None] * len(self._unit_groups)
        self._stream = torch.cuda.Stream(device=params[0].device)
        model.register_forward_pre_hook(lambda mod, args: self._wait_unit(0))
        for i, (_, mod) in enumerate(units, start=1):
            mod.register_forward_pre_hook(lambda mod, args, i=i: self._wait_unit(i))
        return len(units)

    def _wait_unit(self, i: int) -> None:
        ev = self._events[i] if self._events else None
        if ev is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(ev)
            self._events[i] = None

    def hold_until(self, event: Any) -> None:
        """Make the next ``step`` wait (on the device) for ``event``: a snapshot's copies of the state it
        would overwrite (checkpoint/host_copy.py)."""
        self._holds.append(event)

    def _release_holds(self, device: torch.device) -> None:
        if self._holds:
            stream = torch.cuda.current_stream(device)
            for event in self._holds:
                stream.wait_event(event)
            self._holds = []

    def wait_for_update(self) -> None:
        """Make the current stream wait for every queued update (a no-op without overlap)."""
        if self._stream is not None and any(ev is not None for ev in self._events):
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
            self._events = [None] * len(self._events)

    def state_dict(self) -> dict[str, Any]:
        self.wait_for_update()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_for_update()
        super().load_state_dict(state_dict)

    @property
    def fused(self) -> bool:
        return bool(self.defaults.get("fused"))

    def control(self, coef: torch.Tensor | None, bad: torch.Tensor | None = None) -> None:
        """Until ``control(None)``, ``step`` multiplies the gradients by ``coef`` and does nothing when
        ``bad`` != 0. DeepSpeed's ZeRO optimizers call ``step`` once per parameter group (each call
        sees one group), so the verdict holds for every call of one optimizer step."""
        self._control = None if coef is None else (coef, bad if bad is not None else torch.zeros_like(coef))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        ctrl = self._control
        device = self.param_groups[0]["params"][0].device
        self._release_holds(device)
        if closure is None and self.fused and self._use_kernel():
            coef, bad = ctrl if ctrl is not None else (torch.ones((), device=device), torch.zeros((), device=device))
            with phase("adamw"):
                self._kernel_step(coef.to(device=device, dtype=torch.float32).reshape(()),
                                  bad.to(device=device, dtype=torch.float32).reshape(()))
            return None
        if ctrl is None:
            with phase("adamw"):
                return super().step(closure)
        coef, bad = ctrl
        if self.fused:
            # torch's fused kernels read these two attributes (as its AMP grad scaler sets them)
            self.grad_scale = (1.0 / coef.double()).to(device=device, dtype=torch.float32).reshape(())
            self.found_inf = bad.to(device=device, dtype=torch.float32).reshape(())
            try:
                with phase("adamw"):
                    return super().step(closure)
            finally:
                self.__dict__.pop("grad_scale", None)
                self.__dict__.pop("found_inf", None)
        if float(bad) != 0.0:  # unfused: torch's loops take no device-side verdict
            return None
        c = float(coef)
        if c != 1.0:
            torch._foreach_mul_([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None], c)
        with phase("adamw"):
            return super().step(closure)

    def _use_kernel(self) -> bool:
        if self._kernel is None:
            from hpframe.engine import adamw_kernel

            params = [p for g in self.param_groups for p in g["params"]]
            plain = all(not g.get(k) for g in self.param_groups for k in ("amsgrad", "maximize", "capturable"))
            self._kernel = plain and adamw_kernel.kernel_ok(params)
        return self._kernel

    def _kernel_step(self, coef: torch.Tensor, bad: torch.Tensor) -> None:
        """The update through ``adamw_kernel.adamw_step_`` with torch AdamW's state layout; with
        ``overlap_with_forward``, on the side stream, one unit after the other."""
        if self._stream is None:
            self._update(self.param_groups, coef, bad)
            return
        side = self._stream
        self.wait_for_update()  # a unit the last forward did not reach (never, in training) is done first
        side.wait_stream(torch.cuda.current_stream(side.device))  # gradients, coef and bad are ready
        with torch.cuda.stream(side):
            for i, shares in enumerate(self._unit_groups):
                self._update([{**g, "params": ps} for g, ps in zip(self.param_groups, shares) if ps], coef, bad)
                ev = torch.cuda.Event()
                ev.record(side)
                self._events[i] = ev
        # the gradients are freed on the current stream after this step: not reused before the side
        # stream has read them
        for t in [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None] + [coef, bad]:
            t.record_stream(side)

    def _update(self, param_groups: list[dict], coef: torch.Tensor, bad: torch.Tensor) -> None:
        from hpframe.engine.adamw_kernel import adamw_step_

        for group in param_groups:
            ps, gs, ms, vs, steps, lps = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:  # as torch's fused AdamW creates it
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ps.append(p)
                gs.append(p.grad)
                ms.append(st["exp_avg"])
                vs.append(st["exp_avg_sq"])
                steps.append(st["step"])
                lps.append(self.lp_copies.get(id(p)))
            beta1, beta2 = group["betas"]
            adamw_step_(ps, gs, ms, vs, steps, lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2),
                        eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), coef=coef, bad=bad,
                        lps=lps if any(lp is not None for lp in lps) else None)
            self._lp_written.update(id(p) for p, lp in zip(ps, lps) if lp is not None)


def forward_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's children in registration order (for hpframe's models, forward order: embedding,
    blocks, final norm, head), each element of a ModuleList or Sequential a unit of its own."""
    units: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            units.extend((f"{name}.{i}", m) for i, m in enumerate(child))
        else:
            units.append((name, child))
    return units


class _HostCopy:
    """A device tensor on its way to the host: queued now, waited for by ``result()`` only."""

    def __init__(self, t: torch.Tensor) -> None:
        self.event = None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t.clone()

    def result(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()  # the copy, not the work queued after it
        return self.host


def held_gradients(ds_engine: Any) -> tuple[list[tuple[nn.Parameter, torch.Tensor]], bool]:
    """(param, gradient tensor this rank holds for it) pairs, and whether they are ZeRO partitions.

    ZeRO 1/2 keep the reduced gradients of this rank's partition in ``averaged_gradients[group]``
    (one tensor per parameter piece, in ``params_in_partition`` order); ZeRO 0 in ``param.grad``;
    bf16 with ZeRO 1 runs DeepSpeed's BF16_Optimizer, which holds full fp32 gradients per parameter.
    """
    opt = ds_engine.optimizer
    if hasattr(opt, "fp32_groups_gradients"):
        # DeepSpeed's BF16_Optimizer (bf16 with ZeRO 1): full fp32 gradients, already reduced over the
        # (expert-)data-parallel groups, one per bf16 parameter; the update reads views of them.
        pairs = []
        for params, grads in zip(opt.bf16_groups, opt.fp32_groups_gradients):
            pairs.extend(zip(params, grads))
        return pairs, False
    if ds_engine.zero_optimization_stage() > 0:
        pairs = []
        for i, grads in opt.averaged_gradients.items():  # {param group index: [grad pieces]}
            if grads is None:
                continue
            real = [g for g in grads if not getattr(g, "_zero_padding", False)]
            pairs.extend(zip(opt.params_in_partition[i], real))
        return pairs, True
    return [(p, p.grad) for p in ds_engine.module.parameters() if p.grad is not None], False


class StepGuard:
    """Computes the global gradient norm, clips or skips, around DeepSpeed's optimizer step."""

    def __init__(self, ds_engine: Any, optimizer: SkippableAdamW, groups: Any, *, grad_clip: float, tp_rank: int) -> None:
        self.ds, self.optimizer, self.groups = ds_engine, optimizer, groups
        self.grad_clip, self.tp_rank = grad_clip, tp_rank
        self.local_losses: list[torch.Tensor] = []  # this rank's micro-batch losses of the current step
        self.report_extra: torch.Tensor | None = None  # set by the engine before the step: copied to the host with the norm
        self.bad: torch.Tensor | None = None  # device flag of the last step: 1.0 when it was skipped
        self.grad_norm = float("nan")
        self.skipped = False
        self._pending: _HostCopy | None = None
        self._original = ds_engine._take_model_step
        ds_engine._take_model_step = self._take_model_step  # also reached from PipelineEngine's schedule

    def _duplicate(self) -> torch.Tensor | None:
        dup = getattr(self.ds.module, "tied_weight_duplicate", None)
        return dup() if dup is not None else None

    def global_norm_sq(self, held: tuple[list[tuple[nn.Parameter, torch.Tensor]], bool] | None = None) -> torch.Tensor:
        """The squared global gradient norm, fp64 on the collective's device, identical on every rank
        (collective, no host synchronization); ``held`` is ``held_gradients(self.ds)`` if known."""
        pairs, partitioned = held if held is not None else held_gradients(self.ds)
        dup = self._duplicate()
        # fp64 accumulation on the collective's device (CPU for gloo, the GPU for NCCL): an fp32 norm of
        # a sparse embedding gradient is off by ~3e-5 relative.
        dense = torch.zeros((), dtype=torch.float64, device=self.ds.device)
        expert = torch.zeros((), dtype=torch.float64, device=self.ds.device)
        counted = [(p, g) for p, g in pairs
                   if p is not dup and (self.tp_rank == 0 or getattr(p, "tensor_model_parallel", False))]
        if counted and counted[0][1].is_cuda:
            # GPU: fp32 partial sums (accurate at that size), summed in fp64; an fp64 copy of every
            # gradient would cost 2x the memory traffic of the gradients themselves. The Triton kernel
            # where it runs, else one multi-tensor norm kernel per dtype.
            from hpframe.engine import adamw_kernel

            for is_expert, acc in ((False, dense), (True, expert)):
                grads = [g.detach() for p, g in counted if is_moe_param(p) == is_expert]
                if grads and adamw_kernel.sq_sum_ok(grads):
                    acc += adamw_kernel.sq_sum(grads).to(acc.device)
                elif grads:
                    acc += torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).double().pow(2).sum()
        else:
            for p, g in counted:
                sq = g.detach().double().pow(2).sum().to(dense.device)
                if is_moe_param(p):
                    expert += sq
                else:
                    dense += sq
        if partitioned:
            total = dense + expert
            dist.all_reduce(total, group=self.groups.dp)
        else:
            dist.all_reduce(expert, group=self.groups.ep)
            total = dense + expert
        dist.all_reduce(total, group=self.groups.mp)
        return total

    def _bad_flag(self, total: torch.Tensor) -> torch.Tensor:
        """1.0 on every rank when the norm or any rank's loss is not finite, else 0.0 (device, collective)."""
        bad = ~torch.isfinite(total)
        for x in self.local_losses:
            bad = bad | ~torch.isfinite(x.to(total.device)).all()
        flag = bad.to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    @torch.no_grad()
    def _take_model_step(self, lr_kwargs: Any = None) -> None:
        held = held_gradients(self.ds)
        with phase("grad_norm"):
            total = self.global_norm_sq(held)
            bad = self._bad_flag(total)
        norm = total.sqrt()
        coef = torch.ones_like(norm)
        if self.grad_clip > 0:
            c = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            coef = torch.where(torch.isfinite(c) & (c > 0), c, coef)  # a non-finite norm skips the step anyway
        self.bad = bad
        extra = [] if self.report_extra is None else [self.report_extra.to(norm.device, torch.float64).reshape(-1)]
        self.report_extra = None
        self._pending = _HostCopy(torch.cat([norm.reshape(1), bad.double(), *extra]))
        self.optimizer.control(coef, bad)
        try:
            with phase("optimizer"):
                self._original(lr_kwargs)
        finally:
            self.optimizer.control(None)

    def finish(self) -> torch.Tensor:
        """Wait for the step's host copy; sets ``grad_norm`` (nan when not finite) and ``skipped``, and
        returns the engine's ``report_extra`` values (fp64, on the host; empty if none were given)."""
        if self._pending is None:
            raise RuntimeError("no optimizer step was taken since the last finish()")
        vals, self._pending = self._pending.result(), None
        norm, bad = float(vals[0]), float(vals[1])
        self.grad_norm = norm if math.isfinite(norm) else float("nan")
        self.skipped = bad != 0.0
        return vals[2:]
