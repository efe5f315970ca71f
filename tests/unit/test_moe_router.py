"""Router and balance losses on CPU, each against a hand computation on a few tokens:
softmax/sigmoid scores, top-k normalization and scaling, the selection bias (choice only),
group-limited routing, noisy gating and input jitter, load counting and the bias update, and the
Switch, importance, sequence-level and z losses."""

from __future__ import annotations

import math

import pytest
import torch

from hpframe.config.schema import MoEConfig, ScoreFunc
from hpframe.models.moe import (
    Router,
    group_limited_mask,
    importance_loss,
    seq_aux_loss,
    switch_aux_loss,
    z_loss,
)


def make_router(num_experts: int = 4, routing_groups: int = 1, **kw: object) -> Router:
    """A router on hidden = E whose gate is the identity, so the logits equal the input."""
    cfg = MoEConfig(num_experts=num_experts, **kw)  # type: ignore[arg-type]
    r = Router(num_experts, cfg, routing_groups)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(num_experts))
    r.reset_buffers()
    return r


def test_softmax_top2_normalized() -> None:
    r = make_router(top_k=2, score_func="softmax", norm_topk_prob=True).eval()
    logits = [1.0, 3.0, 2.0, 0.0]
    out = r(torch.tensor([logits]))
    z = sum(math.exp(v) for v in logits)
    p = [math.exp(v) / z for v in logits]
    assert out.topk_idx.tolist() == [[1, 2]]
    torch.testing.assert_close(out.scores, torch.tensor([p]))
    torch.testing.assert_close(out.topk_score, torch.tensor([[p[1], p[2]]]))
    torch.testing.assert_close(out.topk_weight, torch.tensor([[p[1] / (p[1] + p[2]), p[2] / (p[1] + p[2])]]))


def test_sigmoid_unnormalized_scaled() -> None:
    r = make_router(top_k=2, score_func="sigmoid", norm_topk_prob=False, route_scale=2.5).eval()
    logits = [0.5, -1.0, 2.0, 1.0]
    out = r(torch.tensor([logits]))
    s = [1 / (1 + math.exp(-v)) for v in logits]
    assert out.topk_idx.tolist() == [[2, 3]]
    torch.testing.assert_close(out.topk_weight, torch.tensor([[2.5 * s[2], 2.5 * s[3]]]))


def test_expert_bias_changes_choice_not_weights() -> None:
    r = make_router(top_k=1, score_func="sigmoid", norm_topk_prob=False).eval()
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    logits = [0.0, 2.0, 0.0, -1.0]
    out = r(torch.tensor([logits]))
    # choice: sigmoid + bias = [.5, .88, .5, 1.27] -> expert 3; weight: its plain sigmoid.
    assert out.topk_idx.tolist() == [[3]]
    torch.testing.assert_close(out.topk_weight, torch.tensor([[1 / (1 + math.exp(1.0))]]))


def test_group_limited_hand_case() -> None:
    # 8 experts, 4 groups of 2, at most 2 groups, top-3.
    r = make_router(num_experts=8, routing_groups=4, top_k=3, score_func="sigmoid", max_nodes_per_token=2).eval()
    #          g0         g1          g2          g3
    logits = [3.0, -5.0, 2.9, 2.8, 0.0, -0.1, 2.7, -5.0]
    # group sums of top-2 sigmoid: g1 (2.9, 2.8 -> 1.89) and g2 (0, -0.1 -> .98) beat g0 (3, -5 -> .96)
    # and g3 (2.7, -5); the unrestricted top-3 would be experts 0, 2, 3.
    out = r(torch.tensor([logits]))
    assert sorted(out.topk_idx[0].tolist()) == [2, 3, 4]
    assert group_limited_mask(torch.tensor([logits]).sigmoid(), 4, 2).tolist() == [
        [False, False, True, True, True, True, False, False]
    ]


def test_group_of_one_expert_uses_top1() -> None:
    mask = group_limited_mask(torch.tensor([[0.1, 0.9, 0.3, 0.8]]), num_groups=4, max_groups=2)
    assert mask.tolist() == [[False, True, False, True]]


def test_group_limited_never_exceeds_max_groups() -> None:
    torch.manual_seed(0)
    r = make_router(num_experts=16, routing_groups=4, top_k=4, score_func="sigmoid", max_nodes_per_token=2)
    r.train()
    with torch.no_grad():
        r.expert_bias.copy_(torch.randn(16) * 0.1)
    out = r(torch.randn(500, 16) * 3)
    groups_per_token = [len(set((row // 4).tolist())) for row in out.topk_idx]
    assert max(groups_per_token) <= 2
    assert min(groups_per_token) >= 1
    free = make_router(num_experts=16, routing_groups=4, top_k=4, score_func="sigmoid")
    free_groups = [len(set((row // 4).tolist())) for row in free(torch.randn(500, 16) * 3).topk_idx]
    assert max(free_groups) > 2  # the limit is what holds it


def test_noisy_gating_and_jitter_in_training_only() -> None:
    r = make_router(top_k=2, noisy_gate_std=0.5, jitter_eps=0.1)
    x = torch.tensor([[1.0, 0.5, -0.5, 2.0], [0.0, 0.1, 0.2, 0.3]])
    r.eval()
    torch.testing.assert_close(r(x).scores, x.softmax(-1))
    r.train()
    torch.manual_seed(3)
    got = r(x)
    torch.manual_seed(3)
    jitter = torch.empty_like(x).uniform_(0.9, 1.1)
    noise = torch.randn(2, 4) * 0.5
    expected_logits = x * jitter  # identity gate
    torch.testing.assert_close(got.logits, expected_logits)
    torch.testing.assert_close(got.scores, (expected_logits + noise).softmax(-1))


def test_load_accum_counts_training_forwards_and_update_bias() -> None:
    r = make_router(top_k=1, score_func="sigmoid", bias_update_rate=0.1)
    x = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    r.train()
    r(x)
    r(x)
    assert r.load_accum.tolist() == [4.0, 2.0, 2.0, 0.0]
    r.eval()
    r(x)
    assert r.load_accum.tolist() == [4.0, 2.0, 2.0, 0.0]  # eval does not count
    r.update_bias(r.load_accum.clone())
    # mean load 2: expert 0 over (-rate), experts 1, 2 balanced (sign 0), expert 3 under (+rate).
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.0, 0.0, 0.1]))
    assert r.load_accum.tolist() == [0.0, 0.0, 0.0, 0.0]
    state = r.state_dict()
    assert "expert_bias" in state and "load_accum" not in state
    with pytest.raises(ValueError, match=r"load has shape \(3,\), expected \(4,\)"):
        r.update_bias(torch.zeros(3))


def test_update_bias_is_a_no_op_when_rate_is_zero() -> None:
    r = make_router(top_k=1)
    r.update_bias(torch.tensor([9.0, 0.0, 0.0, 0.0]))
    assert r.expert_bias.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_switch_aux_loss_hand() -> None:
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1]])
    idx = torch.tensor([[0], [1]])
    # f = [1/2, 1/2, 0], P = [0.65, 0.25, 0.1] -> 3 * (0.325 + 0.125)
    torch.testing.assert_close(switch_aux_loss(scores, idx, ScoreFunc.softmax), torch.tensor(3 * 0.45))
    sig = torch.tensor([[0.5, 0.5, 1.0]])  # normalized to [.25, .25, .5]
    torch.testing.assert_close(switch_aux_loss(sig, torch.tensor([[2]]), ScoreFunc.sigmoid), torch.tensor(1.5))
    uniform = torch.full((4, 4), 0.25)
    torch.testing.assert_close(
        switch_aux_loss(uniform, torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), ScoreFunc.softmax),
        torch.tensor(1.0),
    )


def test_importance_loss_hand() -> None:
    w = torch.tensor([[0.6, 0.4], [1.0, 0.0]])
    idx = torch.tensor([[0, 1], [0, 2]])
    imp = [1.6, 0.4, 0.0]
    mean = sum(imp) / 3
    var = sum((v - mean) ** 2 for v in imp) / 3
    torch.testing.assert_close(importance_loss(w, idx, 3), torch.tensor(var / mean**2))


def test_seq_aux_loss_hand() -> None:
    # 2 sequences of 2 tokens, E=2, k=1.
    scores = torch.tensor([[0.8, 0.2], [0.4, 0.6], [1.0, 1.0], [0.5, 1.5]])
    idx = torch.tensor([[0], [1], [0], [0]])
    # seq 0: f = 2/(1*2) * [1, 1] = [1, 1]; P = mean([.8,.2],[.4,.6]) = [.6,.4] -> 1.0
    # seq 1: f = [2, 0]; P = mean([.5,.5],[.25,.75]) = [.375,.625] -> 0.75
    torch.testing.assert_close(seq_aux_loss(scores, idx, batch=2, seq=2, top_k=1), torch.tensor((1.0 + 0.75) / 2))


def test_z_loss_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), math.log(math.exp(1) + math.exp(2))]
    torch.testing.assert_close(z_loss(logits), torch.tensor((lse[0] ** 2 + lse[1] ** 2) / 2))


def test_balancing_buffers_stay_fp32_under_model_dtype_casts() -> None:
    r = make_router(top_k=1).to(torch.bfloat16)
    assert r.gate.weight.dtype == torch.bfloat16
    assert r.expert_bias.dtype == torch.float32 and r.load_accum.dtype == torch.float32
    r.train()
    for _ in range(300):
        r(torch.tensor([[5.0, 0, 0, 0]], dtype=torch.bfloat16))
    assert r.load_accum[0].item() == 300.0  # a bf16 counter would stall at 256
