"""AdamW as one Triton kernel per tensor, at the memory bandwidth of the GPU (and the gradient norm's
sum of squares, ``sq_sum``, the same way).

The update reads parameter, gradient and both moments and writes parameter and moments back: with
bf16 for all four, 14 bytes per parameter. On one H200 torch's fused AdamW (a multi-tensor kernel)
moved them at ~2.1 TB/s, 24 ms per step for the 3.58 B-parameter mixtral_h200 model; this kernel
streams each tensor with wide blocks (docs/performance.md, section 7, has the measurement).

Same arithmetic as torch's fused AdamW (decoupled weight decay, bias corrections from the step count,
moments used unrounded for the update and stored in their own dtype), in fp32 throughout where
torch's kernel does a few products in fp64 (its hyper-parameters are doubles): with bf16 moments, a
rare rounding tie lands one unit in the last place apart and stays apart. Same state
(``step`` a 0-dim fp32 tensor on the device, ``exp_avg``, ``exp_avg_sq``), so checkpoints and
``state_dict`` do not change. The guard's verdict comes as device tensors: ``coef`` multiplies every
gradient as it is read (clipping), ``bad`` != 0 leaves parameters, moments and step counts as they
were, without a host synchronization.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

_BLOCK = 1024  # elements per program (with 4 warps: the fastest of 12 launch shapes, bench/kernel_sweep.py)


if triton is not None:

    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, lp_ptr, step_ptr, coef_ptr, bad_ptr, n, lr, beta1, beta2, eps,
                      weight_decay, HAS_LP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = tl.load(bad_ptr) == 0
        mask = (offs < n) & keep  # a skipped step reads and writes nothing
        step = tl.load(step_ptr)  # already advanced for this update
        coef = tl.load(coef_ptr)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * coef
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = p - lr * weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        bc1 = 1.0 - tl.exp(step * tl.log(beta1))
        bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))
        p = p - (lr / bc1) * m / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
        if HAS_LP:  # the low-precision copy of a master weight, rounded as copy_ rounds it (to nearest even)
            tl.store(lp_ptr + offs, p.to(lp_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _sq_sum_kernel(g_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


_SQ_BLOCK = 2048  # elements per partial sum of the norm kernel (4 warps; bench/kernel_sweep.py)


def sq_sum_ok(grads: list[torch.Tensor]) -> bool:
    """Whether ``sq_sum`` runs these tensors (Triton, CUDA, floating point; ``HPFRAME_TRITON_NORM=0``
    turns it off and the caller's multi-tensor norm runs)."""
    if triton is None or os.environ.get("HPFRAME_TRITON_NORM", "1") == "0":
        return False
    return bool(grads) and all(g.is_cuda and g.is_floating_point() for g in grads)


@torch.no_grad()
def sq_sum(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the squares of every element of ``grads``: a 0-dim fp64 tensor on their device.

    One kernel per tensor writes fp32 partial sums of 2048 squares each into one buffer, which is then
    summed in fp64: one read of every gradient at the memory bandwidth, no host synchronization, the
    same value on every run (no atomics). torch's ``_foreach_norm`` read bf16 gradients at ~2.3 TB/s on
    an H200 (3.1 ms per step for 3.58 B of them, docs/performance.md section 8).
    """
    sizes = [triton.cdiv(g.numel(), _SQ_BLOCK) for g in grads]
    partial = torch.empty(sum(sizes), dtype=torch.float32, device=grads[0].device)
    start = 0
    for g, k in zip(grads, sizes):
        if k:
            g = g if g.is_contiguous() else g.contiguous()
            _sq_sum_kernel[(k,)](g, partial[start:start + k], g.numel(), BLOCK=_SQ_BLOCK, num_warps=4)
        start += k
    return partial.sum(dtype=torch.float64)


def kernel_ok(params: list[torch.Tensor]) -> bool:
    """Whether ``adamw_step_`` runs these parameters: Triton importable, all on CUDA, contiguous,
    floating point; ``HPFRAME_TRITON_ADAMW=0`` turns it off (torch's fused AdamW then runs)."""
    if triton is None or os.environ.get("HPFRAME_TRITON_ADAMW", "1") == "0":
        return False
    return bool(params) and all(p.is_cuda and p.is_contiguous() and p.is_floating_point() for p in params)


@torch.no_grad()
def adamw_step_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta1: float,
                beta2: float, eps: float, weight_decay: float, coef: torch.Tensor, bad: torch.Tensor,
                lps: list[torch.Tensor | None] | None = None) -> None:
    """One AdamW update of every tensor in place; ``coef``/``bad`` are 0-dim fp32 tensors on the device.

    ``lps[i]``, when given and not None, is a contiguous tensor of ``params[i]``'s size (bf16 for fp32
    master weights) that receives the updated values in its own dtype in the same pass: the copy that
    DeepSpeed's BF16_Optimizer otherwise makes after the update (read 4 bytes, write 2 per parameter).
    """
    if not params:
        return
    # step counts advance unless the step is skipped (as torch's fused AdamW does with found_inf)
    torch._foreach_add_(steps, 1.0)
    torch._foreach_sub_(steps, [bad] * len(steps))
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        n = p.numel()
        if n == 0:
            continue
        g = g if g.is_contiguous() else g.contiguous()
        lp = lps[i] if lps is not None else None
        if lp is not None and (lp.numel() != n or not lp.is_contiguous()):
            raise ValueError(f"adamw_step_: low-precision copy {tuple(lp.shape)} does not match parameter {tuple(p.shape)}")
        grid = (triton.cdiv(n, _BLOCK),)
        _adamw_kernel[grid](p, g, m, v, p if lp is None else lp, s, coef, bad, n, lr, beta1, beta2, eps, weight_decay,
                            HAS_LP=lp is not None, BLOCK=_BLOCK, num_warps=4)
