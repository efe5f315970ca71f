"""Engine: the training loop's view of DeepSpeed (one optimizer step, evaluation, lr, checkpoints).

Loss conventions (identical on every rank after the step):
  per micro-batch  lm = mean token cross-entropy (vocab-parallel over tp), aux = sum of the MoE
                   layers' coefficient-weighted balance losses, loss = lm + aux
  per step         the mean of each over the plan.grad_accum micro-batches of every dp rank
                   (all ranks hold the same number of equal-size micro-batches, so this is the
                   mean over the global batch); the gradient is that of the mean loss.
Without pp, every rank computes them; with pp, the last stage does and broadcasts over its pp group.

After the step, the aux-loss-free router bias update: each router's ``load_accum`` (summed over this
rank's micro-batches) is summed over dp so every replica applies the same update, then
``router.update_bias(load, apply=1 - bad)`` resets it; a skipped step (the guard's device flag)
moves no bias. With pp, each stage updates the routers it owns. No host synchronization is needed
for any of it: the host reads the step's figures from one copy (``StepGuard.finish``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from hpframe.models import Block, MoE, Router
from hpframe.models.moe import in_backward
from hpframe.parallel.tensor import vocab_parallel_cross_entropy
from hpframe.phases import phase


@dataclass
class StepResult:
    loss: float
    lm_loss: float
    aux_loss: float
    grad_norm: float
    """Global gradient norm before clipping (nan when skipped for a non-finite value)."""
    skipped: bool
    moe_stats: dict[str, float | list] = field(default_factory=dict)
    """Per MoE layer owned by this rank's stage: ``layer{i}/tokens_per_expert`` (global counts of the
    step) and ``layer{i}/load_cv`` (std/mean of those counts); ``max_load_cv`` over them."""


def to_device(t: torch.Tensor, device: Any) -> torch.Tensor:
    """``t`` (on the host) on ``device`` without waiting for the device: a copy from pageable memory
    makes CUDA drain the stream first (at a step's start, the previous step's optimizer update), so the
    tensor goes through pinned memory and the copy is queued behind the work already there."""
    dev = torch.device(device)
    if dev.type != "cuda" or t.is_cuda:
        return t.to(dev)
    # contiguous first: a strided tensor (a batch's tokens are a slice of [B, S+1]) would be made
    # contiguous again, in pageable memory, by the copy itself
    return t.contiguous().pin_memory().to(dev, non_blocking=True)


class Engine:
    """Built by ``build_engine``; ``ds`` is the DeepSpeed engine, ``module`` the local model or stage."""

    def __init__(self, *, ds: Any, plan: Any, groups: Any, optimizer: Any, guard: Any, loss_fn: Any | None,
                 compile_loss: bool = False) -> None:
        self.ds, self.plan, self.groups = ds, plan, groups
        self.optimizer, self.guard, self.loss_fn = optimizer, guard, loss_fn
        self._compiled_ce = None
        if compile_loss and plan.tp == 1 and plan.pp == 1:  # train.compile; vocab-parallel CE stays eager
            from hpframe.parallel.compile import compiled_cross_entropy

            self._compiled_ce = compiled_cross_entropy()
        self.rank = dist.get_rank()
        pp_group = plan.ranks.group("pp", self.rank)
        self._last_stage_rank = pp_group[-1]  # the pp group is ordered by stage
        self.is_last_stage = self.rank == self._last_stage_rank
        # capacity drops of every MoE forward of a step (sum of per-layer fractions, count), over
        # all micro-batches, layers and ranks: the step's dropped_token_frac
        self._dropped = [0.0, 0]
        for mod in self.ds.module.modules():
            if isinstance(mod, MoE):
                mod.register_forward_hook(self._count_dropped)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def set_lr(self, lr: float) -> None:
        """Learning rate of every param group for the next steps (the loop owns the schedule)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def _count_dropped(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # training forwards only, and not the recompute of activation checkpointing inside backward
        if module.training and not in_backward() and "dropped_frac" in module.stats:
            self._dropped[0] += module.dropped_frac  # a host float: no device sync per layer
            self._dropped[1] += 1

    def _lm_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy (fp32) of this rank's micro-batch; identical on the TP ranks."""
        if self._compiled_ce is not None:
            return self._compiled_ce(logits, targets)
        return vocab_parallel_cross_entropy(logits, targets, self.groups.tp)

    # ---- training -----------------------------------------------------------------------------
    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepResult:
        """One optimizer step over this rank's ``plan.grad_accum`` micro-batches of (tokens, targets).

        The step's figures (losses, gradient norm, skip flag, balance counts) reach the host in one copy
        that is queued before the optimizer update (pp == 1; see StepGuard), so the host returns and
        prepares the next step while the device still runs the update.
        """
        if len(micro_batches) != self.plan.grad_accum:
            raise ValueError(f"got {len(micro_batches)} micro-batches, the plan's grad_accum is {self.plan.grad_accum}")
        self.guard.local_losses = []
        if not self.ds.module.training:  # after evaluation; the walk over every module costs ~1 ms of host time
            self.ds.train()
        if self.plan.pp > 1:
            lm, aux = self._train_pipeline(micro_batches)
            self.guard.finish()
            with phase("step_stats"):
                report, loads = self._step_report(lm, aux)
                values = report.cpu()
        else:
            values, loads = self._train_flat(micro_batches)
        if loads is not None:
            self._update_router_bias(loads)
        return self._result(values)

    def _step_report(self, lm: list[torch.Tensor], aux: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the host needs of this step, reduced over the ranks, as one fp64 device vector (collective):
        [lm mean, aux mean] over the global batch (from the last stage with pp), [dropped-fraction sum,
        forward count] over every rank (with experts), then the routers' assignment counts summed over dp
        (with routers; also returned as a [layers, E] tensor for the bias update)."""
        dev = self.ds.device
        parts = [self._reduced_means(lm, aux)]
        if self.plan.experts is not None:  # every rank joins, also pipeline stages without MoE layers
            dropped = to_device(torch.tensor(self._dropped, dtype=torch.float64), dev)
            self._dropped = [0.0, 0]
            dist.all_reduce(dropped)  # TP ranks repeat the same MoE computation: equal weights, same mean
            parts.append(dropped)
        loads = None
        routers = self._routers()
        if routers:
            loads = torch.stack([r.load_accum.detach().float() for _, r in routers]).to(dev)  # [layers, E]
            dist.all_reduce(loads, group=self.groups.dp)
            parts.append(loads.double().reshape(-1))
        return torch.cat(parts), loads

    def _device_batch(self, t: torch.Tensor | tuple[torch.Tensor, ...]) -> Any:
        """A micro-batch's tokens or targets, or its ``(tokens, positions)`` inputs, on the device."""
        if isinstance(t, tuple):
            return tuple(to_device(x, self.ds.device) for x in t)
        return to_device(t, self.ds.device)

    def _forward(self, inputs: Any) -> torch.Tensor:
        """Logits of a micro-batch's inputs: tokens, or ``(tokens, positions)`` with data.document_mask."""
        return self.ds(*inputs) if isinstance(inputs, tuple) else self.ds(inputs)

    def _train_flat(self, micro_batches: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        lms, auxs = [], []
        loads = None
        for i, (tokens, targets) in enumerate(micro_batches):
            with phase("forward"):
                logits = self._forward(self._device_batch(tokens))  # [B,S,V/tp]
                lm = self._lm_loss(logits, self._device_batch(targets))
                aux = self.ds.module.aux_loss.float()
                loss = lm + aux
            lms.append(lm.detach().float())
            auxs.append(aux.detach())
            self.guard.local_losses.append(loss.detach())
            with phase("backward"):
                self.ds.backward(loss)  # DeepSpeed scales by 1/grad_accum
            if i == len(micro_batches) - 1:
                with phase("step_stats"):  # copied to the host with the gradient norm, before the update
                    self.guard.report_extra, loads = self._step_report(lms, auxs)
            with phase("step"):
                self.ds.step()  # applies the update (through StepGuard) on the last micro-batch only
        return self.guard.finish(), loads

    def _result(self, values: torch.Tensor) -> StepResult:
        """StepResult from ``_step_report``'s vector (on the host) and the guard's norm and skip flag."""
        v = values.tolist()
        stats: dict[str, float | list] = {}
        if self.plan.experts is not None:
            total, count = v[2], v[3]
            loads = v[4:]
            if not self.guard.skipped:
                stats = self._router_stats(loads)
            stats["dropped_token_frac"] = total / count if count > 0 else 0.0
        return StepResult(
            loss=v[0] + v[1],
            lm_loss=v[0],
            aux_loss=v[1],
            grad_norm=self.guard.grad_norm,
            skipped=self.guard.skipped,
            moe_stats=stats,
        )

    def _train_pipeline(self, micro_batches: list) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        batches = [(self._device_batch(x), self._device_batch(y)) for x, y in micro_batches]
        # The guard runs inside train_batch, after the backward passes: the last stage's losses are
        # recorded by then, so its non-finite check sees them.
        self.loss_fn.on_record = self.guard.local_losses.append
        try:
            with phase("pipeline_schedule"):
                self.ds.train_batch(iter(batches))
        finally:
            self.loss_fn.on_record = None
        return self.loss_fn.pop() if self.is_last_stage else ([], [])

    def _reduced_means(self, lm: list[torch.Tensor], aux: list[torch.Tensor]) -> torch.Tensor:
        """[lm, aux] means over the global batch (micro-batches, dp ranks; from the last stage), fp64 on
        the device, identical on every rank (collective)."""
        if lm:
            v = torch.stack([torch.stack(lm).mean(), torch.stack(aux).mean()]).double().to(self.ds.device)
        else:
            v = torch.zeros(2, dtype=torch.float64, device=self.ds.device)
        if self.plan.pp > 1:
            dist.broadcast(v, src=self._last_stage_rank, group=self.groups.pp)
        dist.all_reduce(v, group=self.groups.dp)
        return v / self.plan.dp

    def _routers(self) -> list[tuple[int, Router]]:
        """(block index, router) of the MoE layers this rank runs, in block order."""
        return [
            (mod.index, mod.mlp.router)
            for mod in self.ds.module.modules()
            if isinstance(mod, Block) and isinstance(mod.mlp, MoE)
        ]

    @torch.no_grad()
    def _update_router_bias(self, loads: torch.Tensor) -> None:
        """The aux-loss-free bias update of every router from the dp-summed counts, on the device; a
        skipped step (the guard's device flag) moves no bias. Resets the counters either way."""
        keep = 1.0 - self.guard.bad if self.guard.bad is not None else None
        for (_, router), load in zip(self._routers(), loads):
            router.update_bias(load.to(router.load_accum.device), apply=keep)

    def _router_stats(self, loads: list[float]) -> dict[str, float | list]:
        """``layer{i}/tokens_per_expert``, ``layer{i}/load_cv`` and ``max_load_cv`` from the flat host counts."""
        routers = self._routers()
        if not routers:
            return {}
        e = len(loads) // len(routers)
        stats: dict[str, float | list] = {}
        worst = 0.0
        for j, (idx, _) in enumerate(routers):
            host = torch.tensor(loads[j * e:(j + 1) * e], dtype=torch.float64)
            cv = float(host.std(correction=0) / host.mean().clamp_min(1e-10))
            stats[f"layer{idx}/tokens_per_expert"] = host.tolist()
            stats[f"layer{idx}/load_cv"] = cv
            worst = max(worst, cv)
        stats["max_load_cv"] = worst
        return stats

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def eval_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean LM loss over the micro-batches of every dp rank (identical on every rank)."""
        if not micro_batches:
            raise ValueError("eval_step needs at least one micro-batch")
        self.optimizer.wait_for_update()
        if self.plan.pp > 1:
            batches = [(self._device_batch(x), self._device_batch(y)) for x, y in micro_batches]
            self.ds.eval_batch(iter(batches), num_micro_batches=len(batches))
            lm, aux = self.loss_fn.pop() if self.is_last_stage else ([], [])
        else:
            self.ds.eval()
            lm = []
            for tokens, targets in micro_batches:
                logits = self._forward(self._device_batch(tokens))
                lm.append(self._lm_loss(logits, self._device_batch(targets)).float())
            aux = [torch.zeros_like(x) for x in lm]
        self.ds.train()
        lm_mean = float(self._reduced_means(lm, aux)[0])
        return lm_mean
