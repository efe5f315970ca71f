"""Faster gradient hand-over for DeepSpeed's BF16_Optimizer (bf16 weights, fp32 master, ZeRO-1).

After each backward, BF16_Optimizer adds every bf16 gradient into its fp32 gradient buffer with
``hp.add_(lp.grad.to(float32))``: a conversion copy (an fp32 temporary the size of the gradient) and
then the add. On one H200 with 3.58 B parameters the two took 38 ms of a 319 ms step
(docs/performance.md, section 6). ``install(optimizer)`` replaces the instance's
``update_hp_grads`` by one that converts as it copies: ``hp.copy_(lp.grad)`` for the first
micro-batch of a step (the buffer holds no gradient yet) and ``hp.add_(lp.grad)`` (mixed-dtype add,
fp32 accumulation) for the next ones, each as one multi-tensor call over all parameters. What it
stores is what DeepSpeed's method stores; the bookkeeping (``_hp_grad``,
``fp32_groups_has_gradients``) is kept the same.

It also replaces ``step`` by one without DeepSpeed's own gradient norm (``_step_without_norm``).
Only the delayed path is replaced: with ``immediate_grad_update`` DeepSpeed does the hand-over in
gradient hooks and its ``update_hp_grads`` returns at once (hpframe's config leaves it off).
"""

from __future__ import annotations

from typing import Any

import torch


def install(optimizer: Any) -> bool:
    """Replace ``optimizer.update_hp_grads`` when it is DeepSpeed's BF16_Optimizer; returns whether it was."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if not isinstance(optimizer, BF16_Optimizer) or optimizer.immediate_grad_update:
        return False
    if getattr(optimizer, "autoep_folding_tp_group", None) is not None:
        return False  # DeepSpeed's AutoEP gradient folding runs inside its own method; keep it

    @torch.no_grad()
    def update_hp_grads(clear_lp_grads: bool = False) -> None:
        copy_dst, copy_src, add_dst, add_src = [], [], [], []
        for i, group in enumerate(optimizer.bf16_groups):
            has = optimizer.fp32_groups_has_gradients[i]
            for j, lp in enumerate(group):
                if lp.grad is None:
                    continue
                hp = optimizer.fp32_groups_gradients[i][j]
                dst, src = (add_dst, add_src) if has[j] else (copy_dst, copy_src)
                dst.append(hp)
                src.append(lp.grad.view(hp.shape))
                lp._hp_grad = hp
                has[j] = True
        # multi-tensor kernels where torch has them for this dtype pair, one kernel per tensor otherwise
        if copy_dst:
            torch._foreach_copy_(copy_dst, copy_src)
        if add_dst:
            torch._foreach_add_(add_dst, add_src)
        if clear_lp_grads and (copy_src or add_src):
            torch._foreach_zero_(copy_src + add_src)

    optimizer.update_hp_grads = update_hp_grads
    if not getattr(optimizer, "_uses_muon", False) and not optimizer.clip_grad > 0:
        optimizer.step = _step_without_norm(optimizer)
    return True


def _step_without_norm(optimizer: Any) -> Any:
    """BF16_Optimizer.step without its own gradient norm.

    DeepSpeed's step first computes a global norm of the fp32 gradients (one norm kernel per tensor,
    a host synchronization to test it) only to detect overflow and clip; hpframe's config turns its
    clipping off, and hpframe's StepGuard has already computed the true norm and handed its verdict to
    the inner SkippableAdamW, which skips a non-finite step on the device. The rest is DeepSpeed's
    step: link the fp32 gradients to the partitions, the inner step, copy the master weights back to
    the bf16 parameters, clear the fp32 gradients. On mixtral_h200 the skipped norm read 14 GB per
    step (docs/performance.md, section 7).
    """

    @torch.no_grad()
    def step(closure: Any = None) -> None:
        if closure is not None:
            raise NotImplementedError(f"{type(optimizer).__name__} does not support closure")
        optimizer.overflow = False
        for param_partition, grad_partition in zip(optimizer.fp32_groups_flat_partition,
                                                   optimizer.fp32_groups_gradient_flat_partition):
            param_partition.grad = (grad_partition.to(param_partition.dtype)
                                    if grad_partition.dtype != param_partition.dtype else grad_partition)
        optimizer.optimizer.step()
        if optimizer.grad_acc_dtype is not torch.float32:
            for param_partition in optimizer.fp32_groups_flat_partition:
                param_partition.grad = None
        optimizer._lazy_init_hp_params_optimizer_state()
        optimizer.update_lp_params()
        optimizer.clear_hp_grads()

    return step
