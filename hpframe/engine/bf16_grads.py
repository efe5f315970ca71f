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

Because every buffer is overwritten (copied, or zeroed for a parameter without a gradient) by the
first hand-over of a step before anything reads it, ``clear_hp_grads`` only resets the bookkeeping:
DeepSpeed's version zero-fills all fp32 gradients twice per step (after its step and in
``zero_grad``), 4 bytes per parameter each time.

With hpframe's Triton AdamW as the inner optimizer, ``update_lp_params`` no longer copies the fp32
master partitions into the bf16 ones: the update kernel writes the bf16 values in its own pass
(``_fuse_lp_copy``).

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
        copy_dst, copy_src, add_dst, add_src, stale = [], [], [], [], []
        for i, group in enumerate(optimizer.bf16_groups):
            has = optimizer.fp32_groups_has_gradients[i]
            for j, lp in enumerate(group):
                hp = optimizer.fp32_groups_gradients[i][j]
                if lp.grad is None:
                    if not has[j]:  # no gradient yet this step: the buffer still holds the last step's
                        stale.append(hp)
                    continue
                dst, src = (add_dst, add_src) if has[j] else (copy_dst, copy_src)
                dst.append(hp)
                src.append(lp.grad.view(hp.shape))
                lp._hp_grad = hp
                has[j] = True
        # multi-tensor kernels where torch has them for this dtype pair, one kernel per tensor otherwise
        if stale:
            torch._foreach_zero_(stale)
        if copy_dst:
            torch._foreach_copy_(copy_dst, copy_src)
        if add_dst:
            torch._foreach_add_(add_dst, add_src)
        if clear_lp_grads and (copy_src or add_src):
            torch._foreach_zero_(copy_src + add_src)

    def clear_hp_grads() -> None:
        # forget which buffers hold a gradient; the next update_hp_grads overwrites or zeroes each one
        # before anything reads it, so the two 4-byte-per-parameter zero fills per step go
        for i, group in enumerate(optimizer.fp32_groups_gradients):
            optimizer.fp32_groups_has_gradients[i] = [False] * len(group)

    optimizer.update_hp_grads = update_hp_grads
    optimizer.clear_hp_grads = clear_hp_grads
    _fuse_lp_copy(optimizer)
    if not getattr(optimizer, "_uses_muon", False) and not optimizer.clip_grad > 0:
        optimizer.step = _step_without_norm(optimizer)
    return True


def _fuse_lp_copy(optimizer: Any) -> None:
    """Let hpframe's AdamW kernel write each bf16 partition as it updates its fp32 master partition.

    BF16_Optimizer's ``update_lp_params`` copies every fp32 master partition into this rank's bf16
    partition after the update (read 4 bytes, write 2 per parameter), then all-gathers the bf16
    partitions over data parallelism. Where the inner optimizer is ``SkippableAdamW`` and its Triton
    kernel ran, the kernel has written the same rounded values (round to nearest even, as ``copy_``)
    in the update's own pass; the replaced method then copies only the partitions the kernel did not
    write and all-gathers as before.
    """
    from deepspeed import comm as dist
    from deepspeed.runtime import bf16_optimizer as ds_bf16

    from hpframe.engine.step import SkippableAdamW

    inner = optimizer.optimizer
    if not isinstance(inner, SkippableAdamW):
        return

    def pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(fp32 master partition, this rank's bf16 partition) per group, as the optimizer holds them now."""
        return [(fp32_part, bf16_parts[dist.get_rank(group=optimizer.real_dp_process_group[i])])
                for i, (bf16_parts, fp32_part) in enumerate(zip(optimizer.bf16_partitioned_groups,
                                                                optimizer.fp32_groups_flat_partition))]

    def link(current: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        inner.lp_copies = {id(f): lp for f, lp in current if lp.numel() == f.numel() and lp.is_contiguous()}

    @torch.no_grad()
    def update_lp_params() -> None:
        # a partition the kernel did not write (another path, or a tensor the optimizer replaced, as a
        # checkpoint load might) is copied as DeepSpeed copies it
        written, current = inner.take_lp_written(), pairs()
        for fp32_part, lp in current:
            if id(fp32_part) not in written:
                lp.data.copy_(fp32_part.data)
        link(current)
        ds_bf16.all_gather_dp_groups(groups_flat=optimizer.bf16_groups_flat,
                                     partitioned_param_groups=optimizer.bf16_partitioned_groups,
                                     dp_process_group=optimizer.real_dp_process_group,
                                     start_alignment_factor=optimizer.nccl_start_alignment_factor,
                                     allgather_bucket_size=optimizer.allgather_bucket_size)

    link(pairs())
    optimizer.update_lp_params = update_lp_params


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
