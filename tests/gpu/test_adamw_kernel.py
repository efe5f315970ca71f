"""hpframe's Triton AdamW (hpframe.engine.adamw_kernel, used by SkippableAdamW on CUDA) against torch's
fused AdamW over several steps: bf16 and fp32 parameters, weight decay on and off, clipping
coefficients that change between steps, a skipped step, and the state torch's optimizer keeps."""

from __future__ import annotations

import pytest
import torch

from hpframe.engine.step import SkippableAdamW

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_torch_fused_adamw(dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1000, 384), (4097,), (3, 5, 7)]  # a partial last block, odd sizes
    ours = [torch.randn(s, device="cuda", generator=g).to(dtype).requires_grad_(True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_(True) for p in ours]
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    opt = SkippableAdamW([{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "weight_decay": 0.0}],
                         fused=True, **kw)
    ref = torch.optim.AdamW([{"params": theirs[:2], "weight_decay": 0.1}, {"params": theirs[2:], "weight_decay": 0.0}],
                            fused=True, **kw)
    assert opt._use_kernel()
    # powers of two: the reference's pre-scaled bf16 gradient is then exact, as the kernel's fp32 product is
    for step, (coef, bad) in enumerate([(1.0, 0.0), (0.25, 0.0), (0.5, 1.0), (0.5, 0.0), (1.0, 0.0)]):
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, device="cuda", generator=g).to(dtype)
            if bad:
                grad[0] = float("nan")
            a.grad, b.grad = grad.clone(), grad * coef
        opt.control(torch.tensor(coef, device="cuda", dtype=torch.float64), torch.tensor([bad], device="cuda"))
        opt.step()
        opt.control(None)
        if not bad:
            ref.step()
    # bf16: a moment stored one unit in the last place apart (a rounding tie decided the other way)
    # stays apart over the next steps; 4e-3 is two such units at the moments' scale here (~0.3)
    tol = dict(rtol=2e-2, atol=4e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
        sa, sb = opt.state[a], ref.state[b]
        assert sa.keys() == sb.keys() and float(sa["step"]) == float(sb["step"]) == 4.0
        assert sa["step"].dtype == sb["step"].dtype and sa["step"].device == sb["step"].device
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], **tol)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], **tol)
    # checkpoints: torch's state_dict round-trips into the optimizer
    ref.load_state_dict(opt.state_dict())


def test_sq_sum_matches_fp64_reference() -> None:
    """The gradient norm's Triton sum of squares: bf16 and fp32 tensors, a partial last block, an empty
    and a non-contiguous tensor, against the fp64 sum; NaN and inf reach the result (the skip verdict)."""
    from hpframe.engine.adamw_kernel import sq_sum, sq_sum_ok

    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(s, device="cuda", generator=g).to(dt)
             for s, dt in (((3000, 517), torch.bfloat16), ((8193,), torch.float32), ((0,), torch.bfloat16))]
    grads.append(torch.randn(64, 96, device="cuda", generator=g).t())  # non-contiguous
    assert sq_sum_ok(grads)
    ref = sum(t.double().pow(2).sum() for t in grads)
    got = sq_sum(grads)
    assert got.dtype == torch.float64 and got.shape == ()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    assert torch.equal(sq_sum(grads), got)  # no atomics: the same value every time
    for bad in (float("nan"), float("inf")):
        broken = [t.clone() for t in grads]
        broken[1][5] = bad
        assert not torch.isfinite(sq_sum(broken))


def test_low_precision_copy_written_in_the_same_pass() -> None:
    """fp32 master weights with bf16 copies (DeepSpeed's BF16_Optimizer partitions): the kernel's bf16
    output equals ``copy_`` of its fp32 result bit for bit, the fp32 update is the one without copies,
    and a skipped step leaves the copy as it was."""
    g = torch.Generator(device="cuda").manual_seed(1)
    shapes = [(1000, 384), (4097,)]
    with_copy = [torch.randn(s, device="cuda", generator=g).requires_grad_(True) for s in shapes]
    without = [p.detach().clone().requires_grad_(True) for p in with_copy]
    lps = [torch.full(s, 9.0, device="cuda", dtype=torch.bfloat16) for s in shapes]
    opt, ref = (SkippableAdamW(ps, lr=3e-3, weight_decay=0.1, fused=True) for ps in (with_copy, without))
    opt.lp_copies = {id(p): lp for p, lp in zip(with_copy, lps)}
    for coef, bad in [(1.0, 0.0), (0.5, 0.0), (0.5, 1.0)]:
        for a, b in zip(with_copy, without):
            a.grad = torch.randn(a.shape, device="cuda", generator=g)
            b.grad = a.grad.clone()
        before = [lp.clone() for lp in lps]
        for o in (opt, ref):
            o.control(torch.tensor(coef, device="cuda"), torch.tensor([bad], device="cuda"))
            o.step()
            o.control(None)
        assert opt.take_lp_written() == {id(p) for p in with_copy} and opt.take_lp_written() == set()
        for a, b, lp, old in zip(with_copy, without, lps, before):
            assert torch.equal(a, b)
            assert torch.equal(lp, old if bad else a.detach().to(torch.bfloat16))
    with pytest.raises(ValueError, match="does not match parameter"):
        opt.lp_copies = {id(with_copy[0]): torch.zeros(7, device="cuda", dtype=torch.bfloat16)}
        opt.step()
