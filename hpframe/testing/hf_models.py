"""Tiny random transformers checkpoints of each family hpframe reads (tests and benchmarks).

``write_checkpoint(family, out)`` builds the model with transformers' own class (MixtralForCausalLM,
DeepseekV3ForCausalLM, Qwen3MoeForCausalLM), gives it weights of visible size with decisive, skewed
routing (large router rows, a random DeepSeek selection bias) and writes it with ``save_pretrained``
in several safetensors shards. Shapes are deliberately odd: a vocabulary of 101 (no tensor-parallel
degree divides it), 6 query heads over 2 key/value heads, an explicit Qwen3 head_dim that is not
hidden/heads, YaRN rotary with mscale_all_dim on DeepSeek-V3. Needs transformers (not a dependency
of hpframe itself).
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch

from hpframe.checkpoint.hf_load import HFCheckpoint
from hpframe.models import build_model as build_hpframe_model

FAMILIES = ("mixtral", "deepseek_v3", "qwen3_moe")


def load_single_device(path: str | Path, model_cfg: Any, moe_cfg: Any, device: str = "cpu") -> torch.nn.Module:
    """hpframe's single-device model of the checkpoint directory ``path``: built on meta, checked against
    the files, materialized on ``device`` and filled by ``HFCheckpoint`` (the reference of the layout tests)."""
    with torch.device("meta"):
        model = build_hpframe_model(model_cfg, moe_cfg)
    weights = HFCheckpoint(path)
    weights.check(model)
    model.to_empty(device=device)
    weights.load_into(model, "", tp_rank=0)
    return model


def hf_config(family: str, **overrides: Any) -> Any:
    """The transformers config object of the tiny ``family`` model."""
    import transformers

    if family == "mixtral":
        kw: dict[str, Any] = dict(vocab_size=101, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                                  num_attention_heads=6, num_key_value_heads=2, head_dim=8, num_local_experts=8,
                                  num_experts_per_tok=2, max_position_embeddings=128, rope_theta=1000.0)
        return transformers.MixtralConfig(**(kw | overrides))
    if family == "qwen3_moe":
        kw = dict(vocab_size=101, hidden_size=48, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=10, num_experts=8, num_experts_per_tok=3,
                  decoder_sparse_step=1, mlp_only_layers=[2], norm_topk_prob=False, max_position_embeddings=128)
        return transformers.Qwen3MoeConfig(**(kw | overrides))
    if family == "deepseek_v3":
        kw = dict(vocab_size=101, hidden_size=48, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=3,
                  num_attention_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4,
                  topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=256,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                   "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                                   "mscale": 1.0, "mscale_all_dim": 0.707})
        return transformers.DeepseekV3Config(**(kw | overrides))
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights of visible size; router rows large so routing is decisive and skewed (per-name seeds)."""
    for name, t in model.state_dict().items():
        if not t.is_floating_point() or "rotary" in name or "inv_freq" in name:
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        r = torch.randn(t.shape, generator=gen)
        if name.endswith("norm.weight") or "layernorm" in name:
            t.copy_(1.0 + 0.3 * r)
        elif name.endswith("gate.weight") and "proj" not in name:
            t.copy_(r)
        elif "e_score_correction_bias" in name:
            t.copy_(0.3 * r)
        else:
            t.copy_(r / max(t.shape[-1], 1) ** 0.5)


def build_model(family: str, seed: int = 1, **overrides: Any) -> torch.nn.Module:
    """The randomized transformers model (fp32, eval mode)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def write_checkpoint(family: str, out: str | Path, *, seed: int = 1, max_shard_size: str = "60KB",
                     **overrides: Any) -> torch.nn.Module:
    """Write the tiny ``family`` checkpoint (several shards) into ``out``; return the transformers model."""
    model = build_model(family, seed, **overrides)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    return model


def sample_tokens(vocab: int, batch: int = 2, seq: int = 24, seed: int = 5) -> torch.Tensor:
    """Fixed token ids [batch, seq]."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
