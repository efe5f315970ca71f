"""Parameter and FLOP counts against hand-derived formulas and published figures.

Published: Mixtral 8x7B 46.7 B total / 12.9 B active (Mistral AI, "Mixtral of experts", 2024);
DeepSeek-V3 671 B total without the MTP module / 37 B active (DeepSeek-V3 technical report, 2024);
GPT-3 175 B (Brown et al. 2020; our layout has no biases and no learned positions, hence 174.6 B).
No processes.
"""

from __future__ import annotations

from hpframe.plan.params import count_params, flops_per_token


def test_mixtral_8x7b(compose_cfg) -> None:
    cfg = compose_cfg("recipe=mixtral_8x7b")
    p = count_params(cfg.model, cfg.moe)
    h, v, layers, f = 4096, 32000, 32, 14336
    attn = h * 4096 + 2 * h * 1024 + 4096 * h  # 32 query heads, 8 kv heads of 128
    expert = 3 * h * f
    per_layer = attn + h * 8 + 8 * expert + 2 * h
    assert p.total == 2 * v * h + h + layers * per_layer == 46_702_792_704
    assert p.active == p.total - layers * 6 * expert == 12_879_925_248
    assert p.by_component["experts"] == layers * 8 * expert
    assert p.active_by_component["experts"] == layers * 2 * expert


def test_deepseek_v3(compose_cfg) -> None:
    cfg = compose_cfg("recipe=deepseek_v3")
    p = count_params(cfg.model, cfg.moe)
    h, v, nh = 7168, 129280, 128
    mla = (h * 1536 + 1536 + 1536 * nh * (128 + 64)  # query: down, norm, up
           + h * (512 + 64) + 512 + 512 * nh * (128 + 128)  # joint kv latent, norm, up
           + nh * 128 * h)  # output
    dense_mlp = 3 * h * 18432
    expert = 3 * h * 2048
    moe_mlp = h * 256 + 256 * expert + expert
    total = 2 * v * h + h + 61 * (mla + 2 * h) + 3 * dense_mlp + 58 * moe_mlp
    assert p.total == total == 671_026_404_352
    assert p.active == total - 58 * (256 - 8) * expert == 37_552_282_624
    assert round(p.total / 1e9) == 671 and round(p.active / 1e9) in (37, 38)


def test_gpt3_175b(compose_cfg) -> None:
    cfg = compose_cfg("recipe=gpt3_175b")
    p = count_params(cfg.model, cfg.moe)
    h = 12288
    assert p.total == p.active == 96 * (12 * h * h + 2 * h) + 50304 * h + h == 174_566_682_624  # vocab padded to 50304, tied
    assert p.by_component["head"] == 0  # tied


def test_flops_per_token_dense_by_hand(compose_cfg) -> None:
    cfg = compose_cfg("recipe=gpt_debug")  # h128, 4 layers, 4 heads, ffn 512 gelu, vocab 2048 tied, seq 128
    h, s = 128, 128
    matmul = 4 * (4 * h * h + 2 * h * 512) + 2048 * h  # blocks + head (the tied embedding is multiplied once, as head)
    attn = 4 * 2 * 4 * (32 + 32) * s  # per layer 2 * heads * (qk + v dims) * seq
    assert flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len) == 6 * matmul + 3 * attn


def test_flops_per_token_moe_counts_active_experts_only(compose_cfg) -> None:
    cfg = compose_cfg("recipe=mixtral_debug")  # h128, 4 layers, 4/2 heads, 8 experts of 256, top-2
    h, s = 128, 128
    attn_w = h * 128 + 2 * h * 64 + 128 * h
    mlp_w = h * 8 + 2 * 3 * h * 256
    expected = 6 * (4 * (attn_w + mlp_w) + 2048 * h) + 3 * 4 * 2 * 4 * (32 + 32) * s
    assert flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len) == expected
