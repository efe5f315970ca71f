"""State-dict adapter between hpframe and the on-disk layouts of transformers' Mixtral, DeepSeek-V3 and Qwen3-MoE.

Targets the files ``save_pretrained`` writes and ``from_pretrained`` reads (published checkpoints
use the same names), not any in-memory layout: transformers 5.x fuses experts in memory but keeps
one tensor per expert on disk:
  Mixtral      model.layers.N.block_sparse_moe.experts.E.{w1,w2,w3}.weight, ...block_sparse_moe.gate.weight
  DeepSeek-V3  model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight, mlp.gate.weight,
               mlp.gate.e_score_correction_bias, mlp.shared_experts.*, MLA q_a_proj/q_a_layernorm/q_b_proj/
               kv_a_proj_with_mqa/kv_a_layernorm/kv_b_proj/o_proj
  Qwen3-MoE    model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight, mlp.gate.weight,
               self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm; dense blocks mlp.{gate,up,down}_proj
``hf_sources`` is the one name map: the whole-state-dict functions here and the streaming loader
(``hpframe.checkpoint.hf_load``) both use it.
Rotary conventions need no weight permutation: hpframe's GQA rotates split halves like transformers'
Mixtral, and hpframe's MLA rotates interleaved pairs like DeepSeek (``rope_interleave: true``).
No torch.distributed; works on full (unsharded) state dicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpframe.config.schema import Activation, Arch, Attention, ModelConfig, MoEConfig, RopeType, ScoreFunc
from hpframe.models.transformer import is_moe_layer

# hpframe block-relative name -> HF layer-relative name (shared by both families)
_COMMON = {
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_GQA = {f"attn.{a}.weight": f"self_attn.{b}_proj.weight" for a, b in zip("wq wk wv wo".split(), "q k v o".split())}
_MLA = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
}
_SWIGLU_HF = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _check(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> Arch:
    """The HF family for this config; ValueError naming the key that has no HF counterpart."""
    m, e = model_cfg, moe_cfg
    arch = Arch(m.arch)
    if arch not in (Arch.mixtral, Arch.deepseek_v3, Arch.qwen3_moe):
        raise ValueError(f"model.arch={arch.value}: the transformers adapter covers mixtral, deepseek_v3 and qwen3_moe")
    if Activation(m.activation) != Activation.swiglu:
        raise ValueError(f"model.activation={Activation(m.activation).value}: transformers' {arch.value} uses swiglu")
    if e.num_experts <= 0 or (arch != Arch.qwen3_moe and (e.moe_layer_freq != 1 or e.dense_layers)):
        raise ValueError(
            f"moe.num_experts={e.num_experts}, moe.moe_layer_freq={e.moe_layer_freq}, moe.dense_layers={list(e.dense_layers)}: "
            f"transformers' {arch.value} needs experts in every block after the dense ones (num_experts>0, freq 1)"
        )
    if arch != Arch.deepseek_v3:
        want = (Attention.gqa, 0, ScoreFunc.softmax, 1.0)
        got = (Attention(m.attention), e.num_shared_experts, ScoreFunc(e.score_func), e.route_scale)
        extra = (m.first_k_dense, e.norm_topk_prob, m.qk_norm) != (0, True, False) if arch == Arch.mixtral else (
            m.first_k_dense != e.moe_layer_freq - 1 or not m.qk_norm)
        if got != want or extra or 0 < e.max_nodes_per_token < e.num_expert_groups:
            raise ValueError(
                f"transformers' {arch.value} needs model.attention=gqa, moe.num_shared_experts=0, moe.score_func=softmax, "
                "moe.route_scale=1.0, no group limit and "
                + ("model.first_k_dense=0, moe.norm_topk_prob=true, model.qk_norm=false" if arch == Arch.mixtral
                   else "model.first_k_dense=moe.moe_layer_freq-1, model.qk_norm=true")
                + f"; got {[str(getattr(g, 'value', g)) for g in got]}, first_k_dense={m.first_k_dense}, "
                f"norm_topk_prob={e.norm_topk_prob}, qk_norm={m.qk_norm}, max_nodes_per_token={e.max_nodes_per_token}"
            )
    else:
        if Attention(m.attention) != Attention.mla or ScoreFunc(e.score_func) != ScoreFunc.sigmoid:
            raise ValueError(
                f"transformers' DeepSeek-V3 needs model.attention=mla and moe.score_func=sigmoid; got "
                f"{Attention(m.attention).value}, {ScoreFunc(e.score_func).value}"
            )
        if e.num_shared_experts < 1:
            raise ValueError(f"moe.num_shared_experts={e.num_shared_experts}: transformers' DeepSeek-V3 needs >= 1")
    return arch


def _layer_map(i: int, model_cfg: ModelConfig, moe_cfg: MoEConfig, arch: Arch) -> dict[str, str]:
    """Full hpframe name -> full HF name for the non-expert tensors of block i."""
    pre, hpre = f"layers.{i}.", f"model.layers.{i}."
    names = {**_COMMON, **(_MLA if arch == Arch.deepseek_v3 else _GQA)}
    if arch == Arch.deepseek_v3:  # the query path is low-rank (wq_a, q_norm, wq_b) or full-rank (wq)
        unused = ("wq",) if model_cfg.q_lora_rank > 0 else ("wq_a", "q_norm", "wq_b")
        names = {k: v for k, v in names.items() if k.split(".")[1] not in unused}
    if model_cfg.qk_norm:
        names |= {"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}
    if not is_moe_layer(i, model_cfg, moe_cfg):
        names |= {f"mlp.{a}.weight": f"mlp.{b}.weight" for a, b in _SWIGLU_HF.items()}
    elif arch == Arch.mixtral:
        names["mlp.router.gate.weight"] = "block_sparse_moe.gate.weight"
    else:
        names["mlp.router.gate.weight"] = "mlp.gate.weight"
    if arch == Arch.deepseek_v3 and is_moe_layer(i, model_cfg, moe_cfg):
        names["mlp.router.expert_bias"] = "mlp.gate.e_score_correction_bias"
        names |= {f"mlp.shared.{a}.weight": f"mlp.shared_experts.{b}.weight" for a, b in _SWIGLU_HF.items()}
    return {pre + a: hpre + b for a, b in names.items()}


def _expert_name(i: int, e: int, w: str, arch: Arch) -> str:
    if arch == Arch.mixtral:
        return f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
    return f"model.layers.{i}.mlp.experts.{e}.{_SWIGLU_HF[w]}.weight"


def _top_map(model_cfg: ModelConfig) -> dict[str, str]:
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not model_cfg.tie_embeddings:
        names["head.weight"] = "lm_head.weight"
    return names


@dataclass(frozen=True)
class Source:
    """Where one hpframe tensor (full, single-device name) comes from in a transformers checkpoint.

    kind: ``direct`` (one HF tensor, same layout), ``vocab`` (one HF tensor of vocab_size rows; rows
    past it are vocabulary padding, zero), ``w13`` (per expert e, the HF gate and up projections
    stacked: ``names[e] = (w1, w3)``), ``w2`` (per expert e, the down projection: ``names[e] = (w2,)``),
    ``zeros`` (no HF counterpart: Mixtral's and Qwen3's selection bias, which they do not have).
    """

    kind: str
    names: tuple[tuple[str, ...], ...] = ()

    def hf_names(self) -> list[str]:
        return [n for group in self.names for n in group]


def hf_sources(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> dict[str, Source]:
    """hpframe full tensor name -> Source, for every persistent tensor of the Transformer."""
    arch = _check(model_cfg, moe_cfg)
    out: dict[str, Source] = {}
    for ours, hf in _top_map(model_cfg).items():
        out[ours] = Source("direct" if ours == "norm.weight" else "vocab", ((hf,),))
    for i in range(model_cfg.num_layers):
        out |= {ours: Source("direct", ((hf,),)) for ours, hf in _layer_map(i, model_cfg, moe_cfg, arch).items()}
        if is_moe_layer(i, model_cfg, moe_cfg):
            experts = range(moe_cfg.num_experts)
            if arch != Arch.deepseek_v3:
                out[f"layers.{i}.mlp.router.expert_bias"] = Source("zeros")
            out[f"layers.{i}.mlp.experts.w13"] = Source(
                "w13", tuple((_expert_name(i, e, "w1", arch), _expert_name(i, e, "w3", arch)) for e in experts))
            out[f"layers.{i}.mlp.experts.w2"] = Source("w2", tuple((_expert_name(i, e, "w2", arch),) for e in experts))
    return out


def to_hf_state_dict(
    state: dict[str, torch.Tensor], model_cfg: ModelConfig, moe_cfg: MoEConfig
) -> dict[str, torch.Tensor]:
    """hpframe Transformer state dict -> transformers on-disk tensors (experts split per expert).

    Vocabulary padding rows are dropped (the original model.vocab_size rows are written). The returned
    tensors are views of ``state`` where possible (no copy); clone them before loading them back into
    the model they came from.
    """
    out: dict[str, torch.Tensor] = {}
    v = model_cfg.vocab_size
    for ours, src in hf_sources(model_cfg, moe_cfg).items():
        t = state[ours]
        if src.kind == "zeros":
            if Arch(model_cfg.arch) != Arch.deepseek_v3 and bool(t.any()):
                raise ValueError(
                    f"{ours} is nonzero (moe.bias_update_rate={moe_cfg.bias_update_rate}): "
                    f"transformers' {Arch(model_cfg.arch).value} has no selection bias, so its routing would differ"
                )
        elif src.kind == "vocab":
            out[src.names[0][0]] = t[:v]
        elif src.kind == "direct":
            out[src.names[0][0]] = t
        elif src.kind == "w13":  # [E, 2F, H]: gate rows, then up rows
            f = t.shape[1] // 2
            for e, (w1, w3) in enumerate(src.names):
                out[w1], out[w3] = t[e, :f], t[e, f:]
        else:
            for e, (w2,) in enumerate(src.names):
                out[w2] = t[e]
    return {k: val.contiguous() for k, val in out.items()}


def from_hf_state_dict(
    hf: dict[str, torch.Tensor], model_cfg: ModelConfig, moe_cfg: MoEConfig
) -> dict[str, torch.Tensor]:
    """transformers on-disk tensors -> hpframe state dict (for ``Transformer.load_state_dict``).

    Tensors hpframe does not model (DeepSeek's multi-token-prediction layers past num_layers,
    rotary caches) are ignored; a missing tensor raises KeyError naming it.
    """
    from hpframe.models.transformer import padded_vocab_size

    out: dict[str, torch.Tensor] = {}
    for ours, src in hf_sources(model_cfg, moe_cfg).items():
        missing = [n for n in src.hf_names() if n not in hf]
        if missing:
            raise KeyError(f"{missing[0]} not found in the transformers state dict")
        if src.kind == "zeros":
            out[ours] = torch.zeros(moe_cfg.num_experts)
        elif src.kind == "direct":
            out[ours] = hf[src.names[0][0]]
        elif src.kind == "vocab":
            t = hf[src.names[0][0]]
            pad = padded_vocab_size(model_cfg) - t.shape[0]
            out[ours] = torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t
        elif src.kind == "w13":
            out[ours] = torch.stack([torch.cat([hf[a], hf[b]]) for a, b in src.names])
        else:
            out[ours] = torch.stack([hf[a] for (a,) in src.names])
    return out


def _rope_config(m: ModelConfig) -> dict[str, Any]:
    if RopeType(m.rope_type) == RopeType.default:
        return {"rope_type": "default", "rope_theta": m.rope_theta}
    out: dict[str, Any] = {
        "rope_type": "yarn", "rope_theta": m.rope_theta, "factor": m.rope_factor,
        "original_max_position_embeddings": m.rope_original_max_len, "beta_fast": m.rope_beta_fast,
        "beta_slow": m.rope_beta_slow, "truncate": m.rope_truncate,
    }
    if m.rope_mscale:
        out["mscale"] = m.rope_mscale
    if m.rope_mscale_all_dim:
        out["mscale_all_dim"] = m.rope_mscale_all_dim
    return out


def to_hf_config(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> dict[str, Any]:
    """config.json for transformers' MixtralForCausalLM, DeepseekV3ForCausalLM or Qwen3MoeForCausalLM
    (the original vocabulary, rope scaling as configured, no quantization)."""
    arch = _check(model_cfg, moe_cfg)
    m, e = model_cfg, moe_cfg
    fe = e.expert_ffn_hidden_size if e.expert_ffn_hidden_size > 0 else m.ffn_hidden_size
    common: dict[str, Any] = {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "max_position_embeddings": max(m.max_seq_len, m.rope_original_max_len if m.rope_type == RopeType.yarn else 0),
        "rms_norm_eps": m.norm_eps,
        "rope_parameters": _rope_config(m),
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "hidden_act": "silu",
        "num_experts_per_tok": e.top_k,
        "dtype": "float32",
    }
    if arch != Arch.deepseek_v3:
        gqa = common | {
            "num_key_value_heads": m.num_kv_heads if m.num_kv_heads > 0 else m.num_heads,
            "head_dim": m.head_dim if m.head_dim > 0 else m.hidden_size // m.num_heads,
            "router_aux_loss_coef": e.aux_loss_coef,
        }
        if arch == Arch.mixtral:
            return gqa | {
                "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "intermediate_size": fe,
                "num_local_experts": e.num_experts, "router_jitter_noise": e.jitter_eps, "sliding_window": None,
            }
        return gqa | {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "intermediate_size": m.ffn_hidden_size, "moe_intermediate_size": fe, "num_experts": e.num_experts,
            "num_local_experts": e.num_experts, "norm_topk_prob": e.norm_topk_prob,
            "decoder_sparse_step": e.moe_layer_freq, "mlp_only_layers": sorted(e.dense_layers),
            "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        }
    limited = 0 < e.max_nodes_per_token < e.num_expert_groups
    return common | {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "intermediate_size": m.ffn_hidden_size,
        "moe_intermediate_size": fe,
        "num_key_value_heads": m.num_heads,
        "n_routed_experts": e.num_experts,
        "n_shared_experts": e.num_shared_experts,
        "routed_scaling_factor": e.route_scale,
        "norm_topk_prob": e.norm_topk_prob,
        "n_group": e.num_expert_groups if limited else 1,
        "topk_group": e.max_nodes_per_token if limited else 1,
        "first_k_dense_replace": m.first_k_dense,
        "q_lora_rank": m.q_lora_rank if m.q_lora_rank > 0 else None,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "rope_interleave": True,
        "attention_bias": False,
        "num_nextn_predict_layers": 0,
    }


def save_hf_checkpoint(model: torch.nn.Module, model_cfg: ModelConfig, moe_cfg: MoEConfig, path: str | Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``from_pretrained(path)`` loads."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, model_cfg, moe_cfg)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(to_hf_config(model_cfg, moe_cfg), indent=2))


def load_hf_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``save_pretrained`` directory (single file or sharded with an index)."""
    from safetensors.torch import load_file

    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {root}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors
