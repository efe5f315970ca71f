"""SkippableAdamW: the clipping multiplier applied inside torch's fused AdamW equals clipping the
gradients first and stepping an unfused AdamW (CPU; torch's fused AdamW runs on CPU too)."""

from __future__ import annotations

import pytest
import torch

from hpframe.engine.step import SkippableAdamW


def test_fused_grad_multiplier_equals_clipped_gradients() -> None:
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (8, 8, 4)]
    fused = [torch.randn(s, requires_grad=True) for s in shapes]
    plain = [p.detach().clone().requires_grad_() for p in fused]
    of = SkippableAdamW(fused, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    op = SkippableAdamW(plain, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=False)
    assert of.scales_in_step and not op.scales_in_step
    for step, coef in enumerate((0.25, 1.0, 0.6)):
        grads = [torch.randn(s, generator=torch.Generator().manual_seed(step * 10 + i)) for i, s in enumerate(shapes)]
        for p, g in zip(fused, grads):
            p.grad = g.clone()
        for p, g in zip(plain, grads):
            p.grad = g * coef
        of.grad_multiplier = coef
        of.step()
        op.step()
        assert of.grad_multiplier == 1.0 and "grad_scale" not in of.__dict__  # one step only
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_unfused_refuses_a_multiplier_and_skip_leaves_state() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = SkippableAdamW([p], lr=0.1, fused=False)
    p.grad = torch.ones(4)
    opt.grad_multiplier = 0.5
    with pytest.raises(RuntimeError, match="fused optimizers only"):
        opt.step()
    opt.skip_next_step = True
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4)) and not opt.state
