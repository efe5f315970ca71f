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
    return True
