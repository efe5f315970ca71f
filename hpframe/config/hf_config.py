"""transformers config.json -> hpframe model fields, for ``model.from_hf=DIR``.

Families: Mixtral (``model_type: mixtral``), DeepSeek-V3 (``deepseek_v3``), Qwen3-MoE (``qwen3_moe``).
Every config.json field that changes what the model computes is either mapped to a ``model.*`` /
``moe.*`` field or refused by name (a sliding window, attention biases, dropout, an unknown rope type,
an unknown quantization, an unknown ``model_type``): never ignored. A field absent from config.json
takes transformers' default for the family.

``hf_fields`` returns two groups of dotted keys:
  fixed     fields that change the computation (shapes, routing, rotary, norms); an override that
            contradicts one of them is refused (``expand_overrides``, ``check_run_config``);
  defaults  fields a run may change freely (name, max_seq_len, init_std, router jitter).
``expand_overrides`` turns ``model.from_hf=DIR`` on a command line into those overrides, so that Hydra
composes (and ``--cfg job`` and ``plan.dry_run`` show) the real model. Standard library only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hpframe.errors import UserError

FAMILIES = ("mixtral", "deepseek_v3", "qwen3_moe")
DEFAULT_THETA = {"mixtral": 1_000_000.0, "deepseek_v3": 10_000.0, "qwen3_moe": 10_000.0}
DEFAULT_EPS = {"mixtral": 1e-5, "deepseek_v3": 1e-6, "qwen3_moe": 1e-6}
MAX_SEQ_LEN_DEFAULT = 4096
"""model.max_seq_len when config.json's max_position_embeddings is larger (rotary tables are
max_seq_len x head_dim/2 per layer; raise it with model.max_seq_len=N for longer sequences)."""


class HFConfigError(UserError):
    """A config.json hpframe cannot reproduce, or an override contradicting it (exit code 2)."""


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed config.json of a checkpoint directory; HFConfigError when absent or unreadable."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise HFConfigError(f"model.from_hf={path}: no config.json there (expected a save_pretrained directory)")
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HFConfigError(f"model.from_hf={path}: config.json is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise HFConfigError(f"model.from_hf={path}: config.json is not a JSON object")
    return data


def _refuse(where: str, field: str, value: Any, why: str) -> HFConfigError:
    return HFConfigError(f"model.from_hf={where}: config.json {field}={value!r} is not supported ({why})")


def _rope_fields(hf: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    """model.rope_* from rope_parameters (transformers 5) or rope_theta + rope_scaling (published files)."""
    rp = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in rp.values()):
        raise _refuse(where, "rope_parameters", rp, "one rope setting per layer type")
    theta = rp.get("rope_theta", hf.get("rope_theta", DEFAULT_THETA[family]))
    kind = rp.get("rope_type", rp.get("type", "default"))
    if rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse(where, "partial_rotary_factor", rp.get("partial_rotary_factor"), "rotary over every head dim only")
    out: dict[str, Any] = {"model.rope_theta": float(theta), "model.rope_type": "default"}
    if kind == "default":
        return out
    if kind != "yarn":
        raise _refuse(where, "rope type", kind, "hpframe implements default and yarn")
    if rp.get("attention_factor") is not None:
        raise _refuse(where, "rope attention_factor", rp["attention_factor"], "yarn's factor is derived from mscale")
    original = int(rp.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 4096))
    factor = rp.get("factor")
    if factor is None:
        factor = hf["max_position_embeddings"] / original
    return out | {
        "model.rope_type": "yarn",
        "model.rope_factor": float(factor),
        "model.rope_original_max_len": original,
        "model.rope_beta_fast": float(rp.get("beta_fast") or 32),
        "model.rope_beta_slow": float(rp.get("beta_slow") or 1),
        "model.rope_mscale": float(rp.get("mscale") or 0),
        "model.rope_mscale_all_dim": float(rp.get("mscale_all_dim") or 0),
        "model.rope_truncate": bool(rp.get("truncate", True)),
    }


def _common(hf: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", hf["hidden_act"], "experts and MLPs are SwiGLU (silu)")
    if hf.get("attention_bias", False):
        raise _refuse(where, "attention_bias", True, "hpframe's projections have no bias")
    if float(hf.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise _refuse(where, "attention_dropout", hf["attention_dropout"], "hpframe has no dropout")
    if hf.get("mlp_bias", False):
        raise _refuse(where, "mlp_bias", True, "hpframe's MLPs have no bias")
    kinds = sorted(set(hf.get("layer_types") or []) - {"full_attention"})
    if kinds:
        raise _refuse(where, "layer_types", kinds, "every block attends over the whole causal context")
    return {
        "model.arch": family,
        "model.hidden_size": int(hf["hidden_size"]),
        "model.num_layers": int(hf["num_hidden_layers"]),
        "model.num_heads": int(hf["num_attention_heads"]),
        "model.vocab_size": int(hf["vocab_size"]),
        "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "model.activation": "swiglu",
        "model.norm_eps": float(hf.get("rms_norm_eps", DEFAULT_EPS[family])),
        "moe.top_k": int(hf.get("num_experts_per_tok", 2)),
        **_rope_fields(hf, family, where),
    }


def _gqa(hf: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    """Mixtral and Qwen3-MoE: GQA attention, softmax router, no shared experts."""
    if family == "mixtral" and hf.get("sliding_window") is not None:
        raise _refuse(where, "sliding_window", hf["sliding_window"], "attention is over the whole causal context")
    if family == "qwen3_moe" and hf.get("use_sliding_window", False):
        raise _refuse(where, "use_sliding_window", True, "attention is over the whole causal context")
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or int(hf["hidden_size"]) // heads
    # Qwen3-MoE's published files say num_experts; transformers 5 writes num_local_experts for both
    experts = int(hf.get("num_local_experts") or hf.get("num_experts") or (8 if family == "mixtral" else 128))
    out = {
        "model.attention": "gqa",
        "model.num_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "model.head_dim": int(head_dim),
        "model.qk_norm": family == "qwen3_moe",
        "model.ffn_hidden_size": int(hf["intermediate_size"]),
        "moe.num_experts": experts,
        "moe.num_shared_experts": 0,
        "moe.score_func": "softmax",
        "moe.route_scale": 1.0,
        "moe.num_expert_groups": 1,
        "moe.max_nodes_per_token": 0,
    }
    if family == "mixtral":
        return out | {"model.first_k_dense": 0, "moe.moe_layer_freq": 1, "moe.dense_layers": [],
                      "moe.norm_topk_prob": True, "moe.expert_ffn_hidden_size": int(hf["intermediate_size"])}
    step = int(hf.get("decoder_sparse_step", 1))
    if step < 1:
        raise _refuse(where, "decoder_sparse_step", step, "must be >= 1")
    # Qwen3 makes block i MoE when (i + 1) % step == 0; hpframe's rule (i - first_k_dense) % freq == 0
    # with i >= first_k_dense gives the same blocks for first_k_dense = step - 1, freq = step.
    return out | {"model.first_k_dense": step - 1, "moe.moe_layer_freq": step,
                  "moe.dense_layers": sorted(int(i) for i in (hf.get("mlp_only_layers") or [])),
                  "moe.norm_topk_prob": bool(hf.get("norm_topk_prob", False)),
                  "moe.expert_ffn_hidden_size": int(hf.get("moe_intermediate_size", 768))}


def _deepseek(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """DeepSeek-V3: MLA, sigmoid router with correction bias, group-limited routing, shared experts."""
    if not hf.get("rope_interleave", True):
        raise _refuse(where, "rope_interleave", False, "hpframe's MLA rotates interleaved pairs")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise _refuse(where, "scoring_func", hf["scoring_func"], "DeepSeek-V3 routing is sigmoid")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise _refuse(where, "topk_method", hf["topk_method"], "DeepSeek-V3 routing is noaux_tc")
    if int(hf.get("moe_layer_freq", 1)) != 1:
        raise _refuse(where, "moe_layer_freq", hf["moe_layer_freq"], "transformers' DeepSeek-V3 has MoE in every block after the dense ones")
    groups, limit = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
    limited = 0 < limit < groups
    return {
        "model.attention": "mla",
        "model.num_kv_heads": -1,
        "model.head_dim": -1,
        "model.qk_norm": False,
        "model.q_lora_rank": int(hf.get("q_lora_rank") or 0),
        "model.kv_lora_rank": int(hf.get("kv_lora_rank", 512)),
        "model.qk_nope_head_dim": int(hf.get("qk_nope_head_dim", 128)),
        "model.qk_rope_head_dim": int(hf.get("qk_rope_head_dim", 64)),
        "model.v_head_dim": int(hf.get("v_head_dim") or 128),
        "model.ffn_hidden_size": int(hf["intermediate_size"]),
        "model.first_k_dense": int(hf.get("first_k_dense_replace") or 0),
        "moe.num_experts": int(hf.get("n_routed_experts", 256)),
        "moe.num_shared_experts": int(hf.get("n_shared_experts") or 0),
        "moe.expert_ffn_hidden_size": int(hf.get("moe_intermediate_size", 2048)),
        "moe.score_func": "sigmoid",
        "moe.norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
        "moe.route_scale": float(hf.get("routed_scaling_factor", 2.5)),
        "moe.num_expert_groups": groups if limited else 1,
        "moe.max_nodes_per_token": limit if limited else 0,
        "moe.moe_layer_freq": 1,
        "moe.dense_layers": [],
    }


def check_quantization(hf: dict[str, Any], where: str) -> tuple[int, int] | None:
    """The FP8 weight block size (rows, cols) of a block-quantized checkpoint; None when not quantized.

    Only DeepSeek-V3's format is read (``quant_method: fp8``, e4m3, ``weight_block_size``); any
    other quantization is refused rather than loaded as garbage.
    """
    q = hf.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise _refuse(where, "quantization_config.quant_method", method, "hpframe dequantizes block-wise fp8 only")
    if q.get("fmt", "e4m3") != "e4m3":
        raise _refuse(where, "quantization_config.fmt", q.get("fmt"), "fp8 weights must be e4m3")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise _refuse(where, "quantization_config.weight_block_size", block, "expected [rows, cols]")
    return int(block[0]), int(block[1])


def hf_fields(hf: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fixed, defaults): the dotted hpframe config keys config.json ``hf`` determines (see module doc)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise _refuse(where, "model_type", family, f"hpframe reads {', '.join(FAMILIES)}")
    check_quantization(hf, where)
    fixed = _common(hf, family, where)
    fixed |= _deepseek(hf, where) if family == "deepseek_v3" else _gqa(hf, family, where)
    max_pos = int(hf.get("max_position_embeddings", MAX_SEQ_LEN_DEFAULT))
    defaults = {
        "model.name": f"{family}:{Path(where).name}",
        "model.max_seq_len": min(max_pos, MAX_SEQ_LEN_DEFAULT),
        "model.init_std": float(hf.get("initializer_range", 0.02)),
        "moe.jitter_eps": float(hf.get("router_jitter_noise", 0.0) or 0.0),
        "moe.noisy_gate_std": 0.0,
        "moe.dropless": True,  # transformers computes every routed token
        "model.vocab_pad_multiple": 0,  # pad the vocabulary to a multiple of parallel.tp when tp does not divide it
    }
    return fixed, defaults


def _parse(value: str) -> Any:
    """A command-line override value as Hydra reads simple values (YAML scalars and flow lists)."""
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(b, bool) or isinstance(a, bool):
        return a is b or str(a).lower() == str(b).lower()
    if isinstance(b, (int, float)) and isinstance(a, (int, float)):
        return float(a) == float(b)
    if isinstance(b, list) and isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return str(getattr(a, "value", a)) == str(getattr(b, "value", b))


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_render(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if isinstance(value, str) and not re.fullmatch(r"[\w.:/-]+", text):
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"  # Hydra's quoted string
    return text


def expand_overrides(overrides: list[str]) -> list[str]:
    """Command-line overrides with ``model.from_hf=DIR`` completed by the fields DIR's config.json sets.

    A user override of a fixed field that contradicts config.json raises HFConfigError naming both
    values; one that agrees is kept; user overrides of the default fields win. Without
    ``model.from_hf`` the list comes back unchanged.
    """
    given: dict[str, tuple[int, str]] = {}
    for i, arg in enumerate(overrides):
        key, eq, value = arg.lstrip("+").partition("=")
        if eq and not arg.startswith("~"):
            given[key] = (i, value)
    if not given.get("model.from_hf", (0, ""))[1]:
        return list(overrides)
    where = str(_parse(given["model.from_hf"][1]))  # a quoted path (spaces) is unquoted as Hydra does
    fixed, defaults = hf_fields(read_config(where), where)
    for key, want in fixed.items():
        if key in given and not _same(_parse(given[key][1]), want):
            raise HFConfigError(
                f"{key}={given[key][1]} contradicts model.from_hf={where}: its config.json gives {_render(want)}"
            )
    extra = [f"{k}={_render(v)}" for k, v in {**defaults, **fixed}.items() if k not in given]
    at = given["model.from_hf"][0] + 1  # next to model.from_hf: before any option (--cfg job) that follows
    return list(overrides[:at]) + extra + list(overrides[at:])


def check_run_config(model: Any, moe: Any) -> None:
    """HFConfigError unless ``model``/``moe`` (ModelConfig/MoEConfig) agree with model.from_hf's config.json
    on every fixed field: a configuration composed without ``expand_overrides`` is refused, not run
    with the wrong architecture."""
    where = model.from_hf
    fixed, _ = hf_fields(read_config(where), where)
    for key, want in fixed.items():
        group, field = key.split(".")
        have = getattr(model if group == "model" else moe, field)
        if not _same(have, want):
            raise HFConfigError(
                f"{key}={_render(getattr(have, 'value', have))} contradicts model.from_hf={where}: "
                f"its config.json gives {_render(want)} (config.json's fields are filled in for a model.from_hf "
                "given on the command line; one set in a file must come with them)"
            )
