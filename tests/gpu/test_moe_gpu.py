"""The MoE GPU fast path (hpframe.models.moe_gpu) against plain autograd references.

Compared: permute + combine (Triton kernels on CUDA, torch gathers elsewhere) against an autograd
graph of index/mul/sum ops in fp32; grouped_mlp (torch._grouped_mm without padding, uneven and empty
groups) against a per-expert fp32 loop; moe_forward against MoE.forward of the same module (outputs,
input/weight/router gradients, aux loss and stats). Tests parametrized over "cpu" run everywhere (the
fallback path); "cuda" ones are marked gpu and skip without a CUDA device.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from hpframe.config.schema import Activation, MoEConfig
from hpframe.models import moe_gpu
from hpframe.models.moe import MoE, moe_forward

CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]),
]
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_combine_match_autograd_reference(device: str, dtype: torch.dtype) -> None:
    t, h, k, e = 301, 1100, 3, 7  # h > one 1024-column block and not a multiple of it
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, h, generator=g).to(device, dtype).requires_grad_(True)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(device)  # [T,k]
    w = torch.rand(t, k, generator=g).to(device).requires_grad_(True)
    scale = torch.randn(t * k, h, generator=g).to(device, dtype)  # stands for the experts: y = x * scale
    gy = torch.randn(t, h, generator=g).to(device, dtype)

    order = torch.argsort(idx.reshape(-1), stable=True)
    inv = moe_gpu.inverse_order(order)
    y = moe_gpu.combine(moe_gpu.permute(x, order, inv, k) * scale, w, inv)
    y.backward(gy)

    xr, wr = x.detach().float().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ys = xr[order // k] * scale.float()  # [N,H] expert-sorted rows
    y_assign = torch.zeros(t * k, h, device=device).index_copy(0, order, ys)  # back to a = t*k+j
    yr = (y_assign.view(t, k, h) * wr[:, :, None]).sum(1)
    yr.backward(gy.float())

    tol = 1e-6 if dtype == torch.float32 else 8e-3
    assert y.dtype == dtype and y.shape == (t, h)
    assert rel(y, yr) < tol
    assert rel(x.grad, xr.grad) < tol
    assert w.grad.dtype == torch.float32 and rel(w.grad, wr.grad) < (1e-6 if dtype == torch.float32 else 2e-2)


def test_inverse_order_is_the_inverse_permutation() -> None:
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(3))
    inv = moe_gpu.inverse_order(order)
    assert torch.equal(inv[order], torch.arange(1000))
    assert torch.equal(order[inv], torch.arange(1000))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_grouped_mlp_matches_per_expert_loop(activation: str) -> None:
    e, h, f = 6, 256, 384
    counts = torch.tensor([37, 0, 129, 1, 0, 90], device="cuda")  # uneven, empty and 1-row groups
    n = int(counts.sum())
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(n, h, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w1 = (torch.randn(e, f, h, device="cuda", generator=g) * h**-0.5).bfloat16().requires_grad_(True)
    w3 = (torch.randn(e, f, h, device="cuda", generator=g) * h**-0.5).bfloat16().requires_grad_(True)
    w2 = (torch.randn(e, h, f, device="cuda", generator=g) * f**-0.5).bfloat16().requires_grad_(True)
    gy = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    use_w3 = activation == "swiglu"
    assert moe_gpu.grouped_mm_ok(x, h, f)
    w_in = torch.cat([w1, w3], dim=1).detach().requires_grad_(True) if use_w3 else w1  # gate rows, then up
    y = moe_gpu.grouped_mlp(x, counts, w_in, w2, swiglu=use_w3)
    y.backward(gy)
    if use_w3:
        w1.grad, w3.grad = w_in.grad[:, :f], w_in.grad[:, f:]

    xr, w1r, w3r, w2r = (t.detach().float().requires_grad_(True) for t in (x, w1, w3, w2))
    outs = []
    for i, xe in enumerate(torch.split(xr, counts.tolist())):
        a = F.silu(xe @ w1r[i].t()) * (xe @ w3r[i].t()) if use_w3 else F.gelu(xe @ w1r[i].t())
        outs.append(a @ w2r[i].t())
    yr = torch.cat(outs)
    yr.backward(gy.float())
    assert torch.isfinite(y).all()
    assert rel(y, yr) < 1e-2
    assert rel(x.grad, xr.grad) < 1e-2
    assert rel(w1.grad, w1r.grad) < 1e-2 and rel(w2.grad, w2r.grad) < 1e-2
    if use_w3:
        assert rel(w3.grad, w3r.grad) < 1e-2
    # empty experts get exactly zero weight gradient
    assert w1.grad[1].abs().max() == 0 and w2.grad[4].abs().max() == 0
    # the weight gradient comes out in the parameter's layout: accumulating it needs no copy
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h1 = moe_gpu.grouped_linear(x, w1, offs)
    raw = torch.autograd.grad(h1, w1, torch.ones_like(h1))[0]
    assert raw.is_contiguous() and raw.shape == w1.shape


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_router_linear_matches_fp32_matmul() -> None:
    """bf16 router logits on tensor cores = the fp32 matmul of the same bf16 values (to summation
    order); the gradients agree with the fp32 path to bf16 precision."""
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(4096, 1024, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(16, 1024, device="cuda", generator=g) * 0.03).bfloat16().requires_grad_(True)
    assert moe_gpu.router_linear_ok(x, w)
    assert not moe_gpu.router_linear_ok(x.detach().float(), w)  # fp32 activations take the fp32 path
    logits = moe_gpu.router_linear(x, w)
    assert logits.dtype == torch.float32
    gl = torch.randn(logits.shape, device="cuda", generator=g)
    logits.backward(gl)
    xr, wr = x.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    ref = F.linear(xr, wr)
    ref.backward(gl)
    assert rel(logits, ref) < 1e-5
    assert x.grad.dtype == torch.bfloat16 and rel(x.grad, xr.grad) < 1e-2
    assert w.grad.dtype == torch.bfloat16 and rel(w.grad, wr.grad) < 1e-2


def _moe(device: str, dtype: torch.dtype, *, e: int, k: int, h: int, f: int, shared: int) -> MoE:
    cfg = MoEConfig(num_experts=e, top_k=k, expert_ffn_hidden_size=f, num_shared_experts=shared,
                    aux_loss_coef=0.01, z_loss_coef=1e-3, dropless=True)
    m = MoE(h, Activation.swiglu, cfg, routing_groups=1, ffn=f)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        m.router.reset_buffers()
    return m.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_forward_matches_module_forward(device: str) -> None:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ref = _moe(device, dtype, e=8, k=2, h=128, f=256, shared=1)
    fast = _moe(device, dtype, e=8, k=2, h=128, f=256, shared=1)
    fast.load_state_dict(ref.state_dict())
    fast.forward = types.MethodType(moe_forward, fast)
    x = torch.randn(3, 50, 128, generator=torch.Generator().manual_seed(9)).to(device, dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ref(xa), fast(xb)
    gy = torch.randn_like(ya)
    (ya * gy).sum().add(ref.aux_loss).backward()
    (yb * gy).sum().add(fast.aux_loss).backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(yb, ya) < tol and rel(xb.grad, xa.grad) < tol
    assert rel(fast.aux_loss, ref.aux_loss) < 1e-5
    for name in ("experts.w13", "experts.w2", "router.gate.weight", "shared.w1.weight"):
        pa = dict(ref.named_parameters())[name]
        pb = dict(fast.named_parameters())[name]
        assert rel(pb.grad, pa.grad) < tol, name
    assert torch.equal(fast.stats["tokens_per_expert"], ref.stats["tokens_per_expert"])


def test_moe_forward_refuses_capacity_dropping() -> None:
    m = _moe("cpu", torch.float32, e=4, k=2, h=16, f=32, shared=0)
    m.cfg.dropless = False
    with pytest.raises(ValueError, match="moe.dropless"):
        moe_forward(m, torch.randn(1, 8, 16))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_fused_swiglu_matches_torch_ops() -> None:
    """The packed SwiGLU kernel (gate columns, then up columns of one [N, 2F] tensor; F not a multiple
    of the kernel's column block) against the torch ops in fp32, forward and the packed gradient."""
    g = torch.Generator(device="cuda").manual_seed(2)
    h = torch.randn(1001, 2 * 1111, device="cuda", generator=g).bfloat16().requires_grad_(True)
    gy = torch.randn(1001, 1111, device="cuda", generator=g).bfloat16()
    y = moe_gpu.packed_swiglu(h)
    y.backward(gy)
    r = h.detach().float().requires_grad_(True)
    yr = F.silu(r[:, :1111]) * r[:, 1111:]
    yr.backward(gy.float())
    assert rel(y, yr) < 5e-3 and rel(h.grad, r.grad) < 5e-3
    assert rel(h.grad[:, :1111], r.grad[:, :1111]) < 5e-3 and rel(h.grad[:, 1111:], r.grad[:, 1111:]) < 5e-3


def test_packed_swiglu_refuses_an_odd_width() -> None:
    with pytest.raises(ValueError, match="even width, got 7 columns"):
        moe_gpu.packed_swiglu(torch.randn(3, 7))


def test_expert_counts_equal_bincount() -> None:
    idx = torch.randint(0, 13, (5000,), generator=torch.Generator().manual_seed(4))
    assert torch.equal(moe_gpu.expert_counts(idx, 16), torch.bincount(idx, minlength=16))


def test_moe_forward_runs_a_subclass_experts_own_forward() -> None:
    """An expert-parallel wrapper subclasses GroupedExperts; the fast path must call its forward."""
    from hpframe.models.moe import GroupedExperts

    class Doubled(GroupedExperts):
        def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x, counts)

    m = _moe("cpu", torch.float32, e=4, k=2, h=16, f=32, shared=0)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(6))
    y_plain = moe_forward(m, x)
    doubled = Doubled(4, 16, 32, Activation.swiglu)
    doubled.load_state_dict(m.experts.state_dict())
    m.experts = doubled
    assert rel(moe_forward(m, x), 2 * y_plain) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,e,skew", [(32768, 8, False), (1000, 6, True), (49152, 64, False), (65536 + 77, 256, True),
                                      (130, 8, "one"), (1, 4, False)])
def test_sort_by_expert_is_the_stable_argsort(device: str, n: int, e: int, skew) -> None:
    """The counting sort (Triton on CUDA) against torch.argsort(stable=True), its inverse and bincount:
    sizes that are not a multiple of the chunk, non-power-of-two expert counts, skewed and one-expert
    routing, empty experts."""
    g = torch.Generator().manual_seed(n + e)
    if skew == "one":
        flat = torch.full((n,), e - 1, dtype=torch.int64)
    elif skew:
        flat = torch.multinomial(torch.linspace(1.0, 20.0, e) ** 2, n, replacement=True, generator=g)
        flat[flat == 1] = 2  # an empty expert
    else:
        flat = torch.randint(0, e, (n,), generator=g)
    flat = flat.to(device)
    order, inv, counts = moe_gpu.sort_by_expert(flat, e)
    ref = torch.argsort(flat, stable=True)
    assert torch.equal(order, ref)
    assert torch.equal(inv[ref], torch.arange(n, device=device))
    assert torch.equal(counts, torch.bincount(flat, minlength=e)) and counts.dtype == torch.int64
