"""SkippableAdamW takes the step guard's verdict as device tensors: the clipping coefficient applied
inside torch's fused AdamW equals clipping the gradients first and stepping a plain AdamW, and a
"bad" flag leaves parameters, moments and step count as they were (CPU; torch's fused AdamW runs on
CPU too). The unfused fallback reads the two scalars on the host and gives the same results."""

from __future__ import annotations

import pytest
import torch

from hpframe.engine.step import SkippableAdamW, forward_units

SHAPES = [(64, 32), (32,), (8, 8, 4)]


def _grads(step: int) -> list[torch.Tensor]:
    return [torch.randn(s, generator=torch.Generator().manual_seed(step * 10 + i)) for i, s in enumerate(SHAPES)]


@pytest.mark.parametrize("fused", [True, False])
def test_control_coefficient_equals_clipped_gradients(fused: bool) -> None:
    torch.manual_seed(0)
    ours = [torch.randn(s, requires_grad=True) for s in SHAPES]
    plain = [p.detach().clone().requires_grad_() for p in ours]
    opt = SkippableAdamW(ours, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    ref = torch.optim.AdamW(plain, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    assert opt.fused == fused
    for step, coef in enumerate((0.25, 1.0, 0.6)):
        for p, q, g in zip(ours, plain, _grads(step)):
            p.grad, q.grad = g.clone(), g * coef
        opt.control(torch.tensor(coef, dtype=torch.float64), torch.zeros(1))
        opt.step()
        opt.control(None)
        ref.step()
        assert "grad_scale" not in opt.__dict__ and "found_inf" not in opt.__dict__
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_bad_flag_skips_the_update_and_keeps_the_state(fused: bool) -> None:
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    opt = SkippableAdamW(params, lr=1e-2, weight_decay=0.1, fused=fused)
    for p, g in zip(params, _grads(0)):
        p.grad = g
    opt.step()  # one real step: moments and step count exist
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    for p, g in zip(params, _grads(1)):
        p.grad = g * float("nan")
    opt.control(torch.tensor(0.5, dtype=torch.float64), torch.ones(1))
    opt.step()
    opt.control(None)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params))
    after = opt.state[params[0]]
    assert float(after["step"]) == float(state["step"]) == 1.0
    assert torch.equal(after["exp_avg"], state["exp_avg"]) and torch.equal(after["exp_avg_sq"], state["exp_avg_sq"])
    # without a verdict the next step updates again
    for p, g in zip(params, _grads(2)):
        p.grad = g
    opt.step()
    assert not torch.equal(before[0], params[0].detach()) and float(opt.state[params[0]]["step"]) == 2.0


@pytest.mark.parametrize("fused", [True, False])
def test_verdict_holds_for_every_group_call(fused: bool) -> None:
    """DeepSpeed's ZeRO optimizers step the inner optimizer once per parameter group, showing it one
    group at a time: the clipping coefficient must reach every group, not only the first. (Coefficients
    change between the two steps: Adam is nearly invariant to one constant gradient scale.)"""
    a, b = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    opt = SkippableAdamW([{"params": [a]}, {"params": [b]}], lr=0.1, fused=fused)
    ref_a, ref_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = torch.optim.AdamW([ref_a, ref_b], lr=0.1)
    groups = opt.param_groups
    for coef in (0.1, 1.0):
        a.grad, b.grad = torch.full((4,), 2.0), torch.full((4,), -3.0)
        ref_a.grad, ref_b.grad = a.grad * coef, b.grad * coef
        opt.control(torch.tensor(coef, dtype=torch.float64), torch.zeros(1))
        for g in groups:  # DeepSpeed's per-group call pattern
            opt.param_groups = [g]
            opt.step()
        opt.param_groups = groups
        opt.control(None)
        ref.step()
    torch.testing.assert_close(a.detach(), ref_a.detach())
    torch.testing.assert_close(b.detach(), ref_b.detach())


def test_forward_units_cover_every_parameter_once_in_forward_order(compose_cfg) -> None:
    from hpframe.models import build_model

    for recipe, tied in (("mixtral_debug", False), ("gpt_debug", True)):
        cfg = compose_cfg(f"recipe={recipe}", f"model.tie_embeddings={str(tied).lower()}")
        model = build_model(cfg.model, cfg.moe)
        units = forward_units(model)
        names = [n for n, _ in units]
        blocks = [f"layers.{i}" for i in range(cfg.model.num_layers)]
        assert names == ["embed", *blocks, "norm"] + ([] if tied else ["head"]), names
        owners: dict[int, str] = {}
        for name, mod in units:
            for p in mod.parameters():
                owners.setdefault(id(p), name)
        assert set(owners) == {id(p) for p in model.parameters()}


def test_overlap_is_off_for_cpu_parameters(compose_cfg) -> None:
    """On the CPU there is no stream to overlap on: no hooks, and the update runs in place as before."""
    from hpframe.models import build_model

    cfg = compose_cfg("recipe=mixtral_debug")
    model = build_model(cfg.model, cfg.moe)
    opt = SkippableAdamW(model.parameters(), lr=1e-3, fused=True)
    assert opt.overlap_with_forward(model) == 0
    assert not model._forward_pre_hooks and not model.layers[0]._forward_pre_hooks
    opt.wait_for_update()  # a no-op without overlap
    assert opt.state_dict()["state"] == {}
