"""MoE layer on CPU: the permutation and its inverse (uneven, empty and overflowing experts), the
three GroupedExperts implementations against a per-token reference, capacity and the exact tokens
dropped under both policies, shared experts, statistics, and float64 gradcheck through the whole
layer. Compared with: naive per-token loops and hand-picked token lists. One GPU test compares the
grouped_mm bf16 path with the loop path (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpframe.config.schema import Activation, DropPolicy, MoEConfig
from hpframe.models.layers import MLP
from hpframe.models.moe import GroupedExperts, MoE, capacity_of, dispatch_order


def make_moe(hidden: int = 8, inner: int = 6, seed: int = 0, **kw: object) -> MoE:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, **kw})  # type: ignore[arg-type]
    moe = MoE(hidden, Activation.swiglu, cfg, routing_groups=1, ffn=inner)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    moe.router.reset_buffers()
    return moe


def expert_ref(ex: GroupedExperts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e on rows x[n,H], written out plainly."""
    w1, w3 = ex.gate_up()
    return (F.silu(x @ w1[e].T) * (x @ w3[e].T)) @ ex.w2[e].T


def moe_ref(moe: MoE, x: torch.Tensor, kept: set[tuple[int, int]] | None = None) -> torch.Tensor:
    """Per-token loop: y_t = sum_j w_tj * expert_{idx_tj}(x_t) over kept (t, j) + shared(x_t)."""
    xf = x.reshape(-1, x.shape[-1])
    r = moe.router(xf)
    out = torch.zeros_like(xf)
    for t in range(xf.shape[0]):
        for j in range(moe.top_k):
            if kept is None or (t, j) in kept:
                e = int(r.topk_idx[t, j])
                out[t] += r.topk_weight[t, j] * expert_ref(moe.experts, e, xf[t : t + 1])[0]
    if moe.shared is not None:
        out = out + moe.shared(xf)
    return out.view_as(x)


@pytest.mark.parametrize("impl", ["loop", "grouped_mm", "padded_bmm"])
def test_grouped_experts_match_reference_with_uneven_and_empty_experts(impl: str) -> None:
    ex = make_moe(inner=8, num_experts=5).experts  # fp32 rows of 8 and 8 elements: 16-byte aligned
    ex.impl = impl
    counts = torch.tensor([3, 0, 7, 1, 0])  # uneven, with empty experts in the middle and at the end
    x = torch.randn(11, 8)
    y = ex(x, counts)
    ref = torch.cat([expert_ref(ex, e, xe) for e, xe in enumerate(torch.split(x, counts.tolist()))])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert ex(x[:0], torch.zeros(5, dtype=torch.long)).shape == (0, 8)


def test_grouped_mm_refuses_unaligned_rows() -> None:
    ex = make_moe(inner=6).experts
    ex.impl = "grouped_mm"
    with pytest.raises(ValueError, match=r"expert inner size \(6\)"):
        ex(torch.randn(3, 8), torch.tensor([1, 2, 0, 0]))


def test_dropless_layer_equals_per_token_reference() -> None:
    torch.manual_seed(0)
    moe = make_moe(num_experts=4, top_k=2, dropless=True).eval()
    # skew the router so routing is far from uniform: expert 2 takes most tokens, expert 3 none
    with torch.no_grad():
        moe.router.gate.weight[2] += 2.0
        moe.router.gate.weight[3] -= 50.0
    x = torch.randn(3, 5, 8).abs()
    y = moe(x)
    torch.testing.assert_close(y, moe_ref(moe, x), rtol=1e-5, atol=1e-6)
    tpe = moe.stats["tokens_per_expert"]
    assert tpe.sum() == 30 and tpe[3] == 0 and tpe[2] == 15
    assert float(moe.stats["dropped_frac"]) == 0.0


def test_dispatch_order_groups_by_expert_and_is_inverted_exactly() -> None:
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    order, counts, routed = dispatch_order(idx, torch.rand(4, 2), 3, None)
    assert counts.tolist() == [3, 2, 3] == routed.tolist()
    assert idx.reshape(-1)[order].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert order.tolist() == [1, 2, 6, 3, 5, 0, 4, 7]  # position order inside each expert
    assert sorted(order.tolist()) == list(range(8))


def test_capacity_formula() -> None:
    assert capacity_of(10, 4, 2, 1.0, 1) == 5
    assert capacity_of(10, 4, 2, 1.25, 1) == 7  # ceil(6.25)
    assert capacity_of(10, 4, 2, 0.1, 4) == 4  # min_capacity wins


def test_drop_policies_keep_the_right_tokens() -> None:
    # 5 tokens, top-1, all to expert 0 except token 2 (expert 1); capacity 2.
    idx = torch.tensor([[0], [0], [1], [0], [0]])
    score = torch.tensor([[0.1], [0.9], [0.5], [0.7], [0.8]])
    order, counts, routed = dispatch_order(idx, score, 2, capacity=2, policy=DropPolicy.probs)
    assert order.tolist() == [1, 4, 2]  # highest scores 0.9, 0.8 for expert 0
    assert counts.tolist() == [2, 1] and routed.tolist() == [4, 1]
    order, counts, _ = dispatch_order(idx, score, 2, capacity=2, policy=DropPolicy.position)
    assert order.tolist() == [0, 1, 2]  # earliest tokens 0, 1 for expert 0
    assert counts.tolist() == [2, 1]


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_dropped_tokens_get_zero_expert_output(policy: str) -> None:
    moe = make_moe(num_experts=4, top_k=2, dropless=False, capacity_factor=0.5, min_capacity=1, drop_policy=policy)
    moe.train()
    with torch.no_grad():
        moe.router.gate.weight[1] += 3.0  # overflow expert 1
    x = torch.randn(2, 6, 8).abs()
    xf = x.reshape(12, 8)
    r = moe.router(xf)
    cap = moe.capacity(12)
    assert cap == 3  # ceil(12/4 * 2 * 0.5)
    # the expected kept set, written from the policy's definition
    kept: set[tuple[int, int]] = set()
    for e in range(4):
        cand = [(t, j) for t in range(12) for j in range(2) if int(r.topk_idx[t, j]) == e]
        if policy == "probs":
            cand.sort(key=lambda tj: -float(r.topk_score[tj].detach()))
        kept |= set(cand[:cap])
    assert len(kept) < 24  # something is dropped
    y = moe(x)
    torch.testing.assert_close(y, moe_ref(moe, x, kept), rtol=1e-5, atol=1e-6)
    fully_dropped = [t for t in range(12) if (t, 0) not in kept and (t, 1) not in kept]
    for t in fully_dropped:
        assert torch.all(y.reshape(12, 8)[t] == 0)
    torch.testing.assert_close(moe.stats["dropped_frac"], torch.tensor(1 - len(kept) / 24))
    assert moe.stats["tokens_per_expert"].sum() == 24


def test_eval_uses_eval_capacity_factor() -> None:
    moe = make_moe(dropless=False, capacity_factor=0.5, eval_capacity_factor=3.0, min_capacity=1)
    assert moe.train().capacity(16) == 4
    assert moe.eval().capacity(16) == 24


def test_shared_experts_add_to_routed_output() -> None:
    moe = make_moe(num_experts=4, num_shared_experts=2).eval()
    assert isinstance(moe.shared, MLP) and moe.shared.w1.weight.shape == (2 * 6, 8)
    x = torch.randn(2, 3, 8)
    y = moe(x)
    routed_only = y - moe.shared(x)
    shared = moe.shared
    moe.shared = None
    torch.testing.assert_close(moe(x), routed_only, rtol=1e-5, atol=1e-6)
    moe.shared = shared
    with torch.no_grad():
        for w in (moe.experts.w13, moe.experts.w2):
            w.zero_()
    torch.testing.assert_close(moe(x), shared(x))


def test_aux_loss_is_weighted_sum_and_stats_present() -> None:
    moe = make_moe(aux_loss_coef=0.1, importance_loss_coef=0.2, seq_aux_loss_coef=0.3, z_loss_coef=0.4).train()
    moe(torch.randn(2, 4, 8))
    s = moe.stats
    total = s["aux_loss"] + s["importance_loss"] + s["seq_aux_loss"] + s["z_loss"]
    torch.testing.assert_close(moe.aux_loss.detach(), total)
    assert moe.aux_loss.requires_grad
    assert all(not v.requires_grad for v in s.values())
    load = s["tokens_per_expert"].float()
    torch.testing.assert_close(s["load_cv"], load.std(correction=0) / load.mean())
    off = make_moe()
    off.cfg.aux_loss_coef = 0.0
    off(torch.randn(1, 2, 8))
    assert float(off.aux_loss) == 0.0 and "aux_loss" not in off.stats


def test_gradcheck_whole_layer_float64() -> None:
    moe = make_moe(
        hidden=4, inner=3, num_experts=4, top_k=2, num_shared_experts=1, dropless=False, capacity_factor=1.0,
        min_capacity=1, aux_loss_coef=0.1, z_loss_coef=0.1, importance_loss_coef=0.1, seq_aux_loss_coef=0.1,
    ).double().train()
    names = [n for n, _ in moe.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in moe.parameters())
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)

    def f(x: torch.Tensor, *ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.func.functional_call(moe, dict(zip(names, ps)), (x,))
        return y, moe.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.gpu
def test_grouped_mm_bf16_on_gpu_matches_loop() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ex = make_moe(hidden=64, inner=32, num_experts=8).experts.cuda().bfloat16()
    counts = torch.tensor([5, 0, 17, 1, 0, 40, 3, 9], device="cuda")
    x = torch.randn(int(counts.sum()), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert ex.pick_impl(x) in ("grouped_mm", "padded_bmm")
    y = ex(x, counts)
    # Reference: the loop in fp32 on the same bf16 values. Outputs are O(50) here, so one bf16 ulp
    # is 0.25: compare by relative norm, not elementwise against another bf16 rounding order.
    ex32 = make_moe(hidden=64, inner=32, num_experts=8).experts.cuda()
    ex32.load_state_dict({k: v.float() for k, v in ex.state_dict().items()})
    ex32.impl = "loop"
    ref = ex32(x.detach().float(), counts)
    assert torch.isfinite(y).all()
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2


def test_expert_implementations_give_the_same_gradients() -> None:
    ref = make_moe(inner=8, num_experts=4, seed=3).experts
    counts = torch.tensor([6, 0, 1, 5])
    x0 = torch.randn(12, 8)
    gy = torch.randn(12, 8)
    grads = {}
    for impl in ("loop", "grouped_mm", "padded_bmm"):
        ex = make_moe(inner=8, num_experts=4, seed=3).experts
        ex.impl = impl
        x = x0.clone().requires_grad_(True)
        (ex(x, counts) * gy).sum().backward()
        grads[impl] = [x.grad, ex.w13.grad, ex.w2.grad]
    assert ref.w13.shape == (4, 16, 8)  # gate rows 0-7, up rows 8-15
    for impl in ("grouped_mm", "padded_bmm"):
        for a, b in zip(grads[impl], grads["loop"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.all(grads["loop"][1][1] == 0)  # the empty expert gets no gradient


def test_state_dict_with_split_gate_and_up_loads_into_the_packed_w13() -> None:
    """SwiGLU experts hold one w13 [E, 2F, H] (gate rows, then up rows); a state dict from before,
    with w1 and w3 [E, F, H], loads into it, and the layer computes the same as with those weights."""
    src = make_moe(inner=8, num_experts=4, seed=5)
    w1, w3 = (w.detach().clone() for w in src.experts.gate_up())
    legacy = {k: v for k, v in src.state_dict().items() if not k.endswith("experts.w13")}
    legacy["experts.w1"], legacy["experts.w3"] = w1, w3
    dst = make_moe(inner=8, num_experts=4, seed=6)
    dst.load_state_dict(legacy)  # strict: nothing missing, nothing unexpected
    assert torch.equal(dst.experts.w13[:, :8], w1) and torch.equal(dst.experts.w13[:, 8:], w3)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(dst(x), src(x))
    with pytest.raises(RuntimeError, match="experts.w13"):
        dst.load_state_dict({k: v for k, v in legacy.items() if k != "experts.w3"})
