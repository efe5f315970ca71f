"""hpframe <-> transformers interoperability on CPU, fp32, tiny random configs built here (nothing
downloaded). Each direction goes through the files on disk (save_pretrained / from_pretrained,
safetensors in tmp_path) and compares the logits of hpframe's Transformer with those of
MixtralForCausalLM / DeepseekV3ForCausalLM for the same weights, with routing made far from
uniform (large router weights, random selection bias). Permuting the experts without the router
must change the logits; permuting the router rows (and bias) with them must not."""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hpframe.config.schema import ModelConfig, MoEConfig  # noqa: E402
from hpframe.models import build_model  # noqa: E402
from hpframe.models.moe import Routing  # noqa: E402
from hpframe.models.hf_adapter import (  # noqa: E402
    from_hf_state_dict,
    load_hf_tensors,
    save_hf_checkpoint,
    to_hf_config,
    to_hf_state_dict,
)

ATOL = 1e-5  # measured: at most 1.6e-6 on logits of magnitude ~4


def mixtral_cfgs() -> tuple[ModelConfig, MoEConfig]:
    m = ModelConfig(
        name="tiny_mixtral", arch="mixtral", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        ffn_hidden_size=48, vocab_size=97, max_seq_len=64, rope_theta=1000.0, attention="gqa",
    )  # type: ignore[arg-type]
    return m, MoEConfig(num_experts=4, top_k=2, score_func="softmax", norm_topk_prob=True)  # type: ignore[arg-type]


def deepseek_cfgs(q_lora_rank: int = 16) -> tuple[ModelConfig, MoEConfig]:
    m = ModelConfig(
        name="tiny_dsv3", arch="deepseek_v3", hidden_size=32, num_layers=3, num_heads=2, ffn_hidden_size=40,
        vocab_size=97, max_seq_len=64, attention="mla", q_lora_rank=q_lora_rank, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, first_k_dense=1, norm_eps=1e-6,
    )  # type: ignore[arg-type]
    e = MoEConfig(
        num_experts=8, num_shared_experts=1, expert_ffn_hidden_size=16, top_k=3, score_func="sigmoid",
        norm_topk_prob=True, route_scale=2.5, num_expert_groups=4, max_nodes_per_token=2,
    )  # type: ignore[arg-type]
    return m, e


CASES = {
    "mixtral": mixtral_cfgs,
    "deepseek_v3": deepseek_cfgs,
    "deepseek_v3_full_rank_q": lambda: deepseek_cfgs(q_lora_rank=0),
}


@torch.no_grad()
def randomize_(state: dict[str, torch.Tensor], seed: int, with_bias: bool) -> None:
    """Weights of visible size everywhere; router weights large so routing is decisive and skewed."""
    for k, v in state.items():
        if "rotary" in k or v.dtype != torch.float32:
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(k.encode()))  # per tensor name
        if k.endswith("norm.weight") or "layernorm" in k:
            v.copy_(1.0 + 0.3 * torch.randn(v.shape, generator=gen))
        elif "gate.weight" in k and "proj" not in k:  # router (hpframe router.gate / HF mlp.gate)
            v.copy_(torch.randn(v.shape, generator=gen))
        elif "bias" in k:  # DeepSeek's selection bias (Mixtral has none: left at zero)
            if with_bias:
                v.copy_(0.3 * torch.randn(v.shape, generator=gen))
        else:
            v.copy_(torch.randn(v.shape, generator=gen) / v.shape[-1] ** 0.5)


@contextlib.contextmanager
def capture_routing(model: torch.nn.Module) -> Iterator[list[Routing]]:
    """Collect the Routing of every MoE layer during the forward calls inside the block."""
    seen: list[Routing] = []
    hooks = [m.router.register_forward_hook(lambda mod, inp, out: seen.append(out)) for m in model.moe_modules()]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def assert_not_uniform(routing: list[Routing], model: torch.nn.Module) -> None:
    """Routing far from uniform: decisive, token-dependent weights and an uneven load."""
    for r in routing:
        assert r.topk_weight[:, 0].std() > 0.1  # combine weights vary a lot across tokens
        assert len({tuple(sorted(row)) for row in r.topk_idx.tolist()}) > 2  # many expert sets
    loads = [m.stats["tokens_per_expert"] for m in model.moe_modules()]
    assert any(int(ld.max()) > int(ld.min()) + 4 for ld in loads)


def hf_model_from_dir(path: Path) -> torch.nn.Module:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("case", list(CASES))
def test_hpframe_to_transformers_same_logits(case: str, tmp_path: Path) -> None:
    model_cfg, moe_cfg = CASES[case]()
    ours = build_model(model_cfg, moe_cfg)
    ours.init_weights(seed=0)
    sd = {k: v for k, v in ours.state_dict().items()}
    randomize_(sd, seed=1, with_bias=case != "mixtral")
    ours.eval()
    save_hf_checkpoint(ours, model_cfg, moe_cfg, tmp_path)
    theirs = hf_model_from_dir(tmp_path)
    t = tokens(model_cfg.vocab_size)
    with capture_routing(ours) as routing:
        ours_logits = ours(t)
    torch.testing.assert_close(theirs(t).logits, ours_logits, rtol=1e-5, atol=ATOL)
    assert_not_uniform(routing, ours)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] in ("mixtral", "deepseek_v3")


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_to_hpframe_same_logits(case: str, tmp_path: Path) -> None:
    model_cfg, moe_cfg = CASES[case]()
    config = transformers.AutoConfig.for_model(**to_hf_config(model_cfg, moe_cfg))
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(theirs.state_dict(), seed=2, with_bias=case != "mixtral")  # state_dict tensors share storage with the parameters
    theirs.save_pretrained(str(tmp_path))
    theirs.eval()
    ours = build_model(model_cfg, moe_cfg)
    ours.init_weights(seed=0)
    ours.load_state_dict(from_hf_state_dict(load_hf_tensors(tmp_path), model_cfg, moe_cfg), strict=True)
    ours.eval()
    t = tokens(model_cfg.vocab_size)
    with capture_routing(ours) as routing:
        ours_logits = ours(t)
    torch.testing.assert_close(ours_logits, theirs(t).logits, rtol=1e-5, atol=ATOL)
    assert_not_uniform(routing, ours)


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3"])
def test_permuting_experts_changes_logits_unless_router_follows(case: str, tmp_path: Path) -> None:
    model_cfg, moe_cfg = CASES[case]()
    ours = build_model(model_cfg, moe_cfg)
    ours.init_weights(seed=0)
    randomize_(ours.state_dict(), seed=3, with_bias=case != "mixtral")
    ours.eval()
    t = tokens(model_cfg.vocab_size)
    base = ours(t)
    hf = {k: v.clone() for k, v in to_hf_state_dict(ours.state_dict(), model_cfg, moe_cfg).items()}
    # Reversal maps routing groups onto routing groups (group g -> G-1-g), so with the router rows
    # permuted along, group-limited routing is unchanged too.
    perm = torch.arange(moe_cfg.num_experts - 1, -1, -1)
    key = "block_sparse_moe.experts." if case == "mixtral" else "mlp.experts."
    swapped = {}
    for k, v in hf.items():
        if key in k:
            head, rest = k.split(key)
            e, tail = rest.split(".", 1)
            k = f"{head}{key}{int(perm[int(e)])}.{tail}"  # expert e now sits at slot perm[e]
        swapped[k] = v
    ours.load_state_dict(from_hf_state_dict(swapped, model_cfg, moe_cfg))
    assert (ours(t) - base).abs().max() > 1e-2
    inv = torch.argsort(perm)  # router row perm[e] must score like old row e
    for k, v in swapped.items():
        if k.endswith(("gate.weight", "e_score_correction_bias")) and "proj" not in k:
            swapped[k] = v[inv]
    ours.load_state_dict(from_hf_state_dict(swapped, model_cfg, moe_cfg))
    torch.testing.assert_close(ours(t), base, rtol=1e-5, atol=1e-5)


def test_mixtral_refuses_a_selection_bias() -> None:
    model_cfg, moe_cfg = mixtral_cfgs()
    ours = build_model(model_cfg, moe_cfg)
    ours.init_weights(seed=0)
    with torch.no_grad():
        ours.layers[1].mlp.router.expert_bias[2] = 0.5
    with pytest.raises(ValueError, match="layers.1.mlp.router.expert_bias is nonzero"):
        to_hf_state_dict(ours.state_dict(), model_cfg, moe_cfg)


def test_round_trip_is_identity() -> None:
    model_cfg, moe_cfg = deepseek_cfgs()
    ours = build_model(model_cfg, moe_cfg)
    ours.init_weights(seed=4)
    sd = ours.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, model_cfg, moe_cfg), model_cfg, moe_cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize(
    ("arch_override", "message"),
    [
        ({"arch": "gpt"}, "model.arch=gpt"),
        ({"first_k_dense": 1}, "transformers' mixtral needs"),
    ],
)
def test_unsupported_configs_raise(arch_override: dict[str, object], message: str) -> None:
    model_cfg, moe_cfg = mixtral_cfgs()
    for k, v in arch_override.items():
        setattr(model_cfg, k, v)
    with pytest.raises(ValueError, match=message):
        to_hf_config(model_cfg, moe_cfg)


def test_config_json_of_the_full_scale_deepseek_recipe() -> None:
    from test_models_transformer import compose_run

    cfg = compose_run("recipe=deepseek_v3")
    hf = to_hf_config(cfg.model, cfg.moe)
    assert (hf["n_routed_experts"], hf["n_group"], hf["topk_group"], hf["num_experts_per_tok"]) == (256, 8, 4, 8)
    assert (hf["first_k_dense_replace"], hf["q_lora_rank"], hf["moe_intermediate_size"]) == (3, 1536, 2048)
    assert hf["routed_scaling_factor"] == 2.5 and hf["rope_interleave"] is True
    config = transformers.AutoConfig.for_model(**hf)
    assert config.num_hidden_layers == 61 and config.qk_head_dim == 192
