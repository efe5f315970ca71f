"""Cross-checks between the model, MoE, parallel and training settings (degrees already resolved).

Every refusal is a PlanError naming the keys and numbers; settings that silently do nothing are
reported as warnings in the plan.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from hpframe.config.schema import Attention, DType, ModelConfig, MoEConfig, RunConfig
from hpframe.plan.errors import PlanError
from hpframe.plan.mesh import Degrees
from hpframe.plan.params import moe_layers, num_kv_heads, padded_vocab


def _divides(what: str, key_a: str, a: int, key_b: str, b: int) -> None:
    if b % a:
        raise PlanError(
            f"{key_a}={a} does not divide {key_b}={b} ({what})",
            key=f"{key_a}, {key_b}",
            values={key_a: a, key_b: b},
        )


def validate_model(cfg: RunConfig, warnings: list[str]) -> None:
    """Checks of the model alone (no parallel degrees)."""
    m, moe = cfg.model, cfg.moe
    for key, v in (("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers), ("model.num_heads", m.num_heads),
                   ("model.ffn_hidden_size", m.ffn_hidden_size), ("model.vocab_size", m.vocab_size), ("data.seq_len", cfg.data.seq_len)):
        if v < 1:
            raise PlanError(f"{key}={v} must be >= 1", key=key, values={key: v})
    if m.attention == Attention.gqa:
        if m.head_dim == -1 and m.hidden_size % m.num_heads:
            raise PlanError(
                f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}; set model.head_dim",
                key="model.hidden_size, model.num_heads",
                values={"model.hidden_size": m.hidden_size, "model.num_heads": m.num_heads},
            )
        nkv = num_kv_heads(m)
        if nkv > m.num_heads or m.num_heads % nkv:
            raise PlanError(
                f"model.num_kv_heads={nkv} must divide model.num_heads={m.num_heads}",
                key="model.num_kv_heads, model.num_heads",
                values={"model.num_kv_heads": nkv, "model.num_heads": m.num_heads},
            )
    elif m.num_kv_heads != -1:
        warnings.append(f"model.num_kv_heads={m.num_kv_heads} has no effect with model.attention=mla")
    if cfg.data.seq_len > m.max_seq_len:
        raise PlanError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}",
            key="data.seq_len, model.max_seq_len",
            values={"data.seq_len": cfg.data.seq_len, "model.max_seq_len": m.max_seq_len},
        )
    if moe.num_experts < 0:
        raise PlanError(f"moe.num_experts={moe.num_experts} must be >= 0", key="moe.num_experts", values={"moe.num_experts": moe.num_experts})
    if moe.num_experts > 0:
        if not 1 <= moe.top_k <= moe.num_experts:
            raise PlanError(
                f"moe.top_k={moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}",
                key="moe.top_k, moe.num_experts",
                values={"moe.top_k": moe.top_k, "moe.num_experts": moe.num_experts},
            )
        if moe.moe_layer_freq < 1:
            raise PlanError(f"moe.moe_layer_freq={moe.moe_layer_freq} must be >= 1", key="moe.moe_layer_freq", values={"moe.moe_layer_freq": moe.moe_layer_freq})
        if not moe_layers(m, moe):
            warnings.append(f"model.first_k_dense={m.first_k_dense} >= model.num_layers={m.num_layers}: no block is MoE, the moe settings have no effect")
        if moe.dropless and moe.capacity_factor != 1.25:
            warnings.append(f"moe.capacity_factor={moe.capacity_factor} has no effect with moe.dropless=true")
    else:
        if m.first_k_dense:
            warnings.append(f"model.first_k_dense={m.first_k_dense} has no effect without experts (moe.num_experts=0)")
        if moe.num_shared_experts:
            warnings.append(f"moe.num_shared_experts={moe.num_shared_experts} has no effect with moe.num_experts=0")


def validate_parallel(cfg: RunConfig, d: Degrees, warnings: list[str]) -> None:
    """Checks that involve the parallel degrees."""
    m, moe, p = cfg.model, cfg.moe, cfg.parallel
    if d.tp > 1:
        _divides("each tensor-parallel rank takes whole attention heads", "parallel.tp", d.tp, "model.num_heads", m.num_heads)
        if m.attention == Attention.gqa:
            _divides("each tensor-parallel rank takes whole key/value heads", "parallel.tp", d.tp, "model.num_kv_heads", num_kv_heads(m))
        if padded_vocab(m, d.tp) % d.tp:
            raise PlanError(
                f"parallel.tp={d.tp} does not divide model.vocab_size={m.vocab_size} padded to a multiple of "
                f"model.vocab_pad_multiple={m.vocab_pad_multiple} ({padded_vocab(m, d.tp)} rows; the embedding and head "
                "are split over the vocabulary; model.vocab_pad_multiple=0 pads to a multiple of parallel.tp)",
                key="parallel.tp, model.vocab_size", values={"parallel.tp": d.tp, "model.vocab_size": m.vocab_size,
                                                           "model.vocab_pad_multiple": m.vocab_pad_multiple},
            )
        if len(moe_layers(m, moe)) < m.num_layers:  # dense MLPs exist and are split over their inner dimension
            _divides("the dense MLP is split over its inner dimension", "parallel.tp", d.tp, "model.ffn_hidden_size", m.ffn_hidden_size)
    elif p.sequence_parallel:
        warnings.append("parallel.sequence_parallel=true has no effect with parallel.tp=1")
    if d.ep > 1 and moe.num_experts == 0:
        warnings.append(f"parallel.ep={d.ep} has no effect with moe.num_experts=0 (dense model)")
    validate_precision(cfg, d)
    if d.zero_stage > 0 and d.dp == 1 and not (needs_zero_optimizer(cfg) and d.zero_stage == 1):
        warnings.append(f"parallel.zero_stage={d.zero_stage} has no effect with dp=1 (nothing to shard over)")
    if p.pipeline_layout and d.pp == 1 and list(p.pipeline_layout) == [m.num_layers]:
        warnings.append("parallel.pipeline_layout has no effect with parallel.pp=1")


# (key, lower bound, whether the bound itself is allowed): numbers with a range. Every float of the
# config must be finite besides (``validate_finite``).
_BOUNDS: tuple[tuple[str, float, bool], ...] = (
    ("train.steps", 1, True), ("train.lr", 0, True), ("train.min_lr", 0, True), ("train.warmup_steps", 0, True),
    ("train.weight_decay", 0, True), ("train.beta1", 0, True), ("train.beta2", 0, True), ("train.grad_clip", 0, True),
    ("train.log_interval", 1, True), ("train.eval_interval", 0, True), ("train.eval_steps", 1, True),
    ("train.max_nonfinite_steps", 1, True), ("train.collective_timeout_s", 0, True), ("train.fail_at_step", 0, True),
    ("data.num_synthetic_tokens", 1, True), ("data.eval_fraction", 0, True),
    ("checkpoint.interval", 0, True), ("checkpoint.keep_last", 0, True), ("checkpoint.preempt_grace_s", 0, False),
    ("moe.capacity_factor", 0, False), ("moe.eval_capacity_factor", 0, False), ("moe.min_capacity", 0, True),
    ("moe.aux_loss_coef", 0, True), ("moe.importance_loss_coef", 0, True), ("moe.seq_aux_loss_coef", 0, True),
    ("moe.z_loss_coef", 0, True), ("moe.bias_update_rate", 0, True), ("moe.noisy_gate_std", 0, True),
    ("moe.jitter_eps", 0, True),
    ("model.rope_theta", 0, False), ("model.norm_eps", 0, False), ("model.init_std", 0, False),
    ("cluster.nodes", 1, True), ("cluster.gpu_memory_gb", 0, False), ("cluster.intra_node_bw_GBps", 0, False),
    ("cluster.inter_node_bw_GBps", 0, False), ("cluster.peak_tflops", 0, False), ("cluster.storage_bw_GBps", 0, False),
    ("cluster.gpu_mtbf_hours", 0, False), ("cluster.host_copy_bw_GBps", 0, False), ("cluster.host_write_GBps", 0, False),
    ("plan.assumed_mfu", 0, False),
)
_BELOW_ONE = ("train.beta1", "train.beta2", "data.eval_fraction")  # also < 1
"""Keys whose value must also stay below 1."""


def _value(cfg: RunConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate_finite(node: Any, prefix: str = "") -> None:
    """Refuse NaN and infinity in any float setting (``train.lr=inf`` would train on NaN weights)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate_finite(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise PlanError(f"{key}={value} must be a finite number", key=key, values={key: value})


def validate_settings(cfg: RunConfig) -> None:
    """Finite numbers everywhere; steps, counts, intervals, rates and sizes within their ranges."""
    validate_finite(cfg)
    for key, low, inclusive in _BOUNDS:
        value = _value(cfg, key)
        if value < low or (value == low and not inclusive):
            rel = ">=" if inclusive else ">"
            raise PlanError(f"{key}={value} must be {rel} {low:g}", key=key, values={key: value})
        if key in _BELOW_ONE and value >= 1:
            raise PlanError(f"{key}={value} must be < 1", key=key, values={key: value})


def validate_train(cfg: RunConfig, warnings: list[str]) -> None:
    """Loop settings that the planner can check before anything runs."""
    validate_settings(cfg)
    t = cfg.train
    if t.profile_from_step < 0:
        raise PlanError(f"train.profile_from_step={t.profile_from_step} must be >= 0 (0 = off)",
                        key="train.profile_from_step", values={"train.profile_from_step": t.profile_from_step})
    if t.gc_interval < 0:
        raise PlanError(f"train.gc_interval={t.gc_interval} must be >= 0 (0 = Python's automatic collection)",
                        key="train.gc_interval", values={"train.gc_interval": t.gc_interval})
    if t.profile_from_step > 0 and t.profile_num_steps < 1:
        raise PlanError(f"train.profile_num_steps={t.profile_num_steps} must be >= 1",
                        key="train.profile_num_steps", values={"train.profile_num_steps": t.profile_num_steps})
    last = t.profile_from_step + t.profile_num_steps - 1
    if t.profile_from_step > 0 and last > t.steps:
        warnings.append(f"train.profile_from_step={t.profile_from_step} with train.profile_num_steps={t.profile_num_steps} "
                        f"ends at step {last} > train.steps={t.steps}: nothing will be profiled")


def validate_cluster(cfg: RunConfig) -> None:
    """Cost-model figures of ``cluster`` that would make the estimates meaningless."""
    c = cfg.cluster
    if not 0.0 < c.all_to_all_efficiency <= 1.0:
        raise PlanError(f"cluster.all_to_all_efficiency={c.all_to_all_efficiency} must be in (0, 1] "
                        "(the fraction of the link bandwidth an all-to-all achieves)",
                        key="cluster.all_to_all_efficiency", values={"cluster.all_to_all_efficiency": c.all_to_all_efficiency})
    if c.collective_latency_us < 0:
        raise PlanError(f"cluster.collective_latency_us={c.collective_latency_us} must be >= 0",
                        key="cluster.collective_latency_us", values={"cluster.collective_latency_us": c.collective_latency_us})


def needs_zero_optimizer(cfg: RunConfig) -> bool:
    """bf16 with fp32 master weights: the master copy lives in DeepSpeed's BF16/ZeRO optimizers, so
    ZeRO stage >= 1 is required (and stage 1 does something even at dp = 1)."""
    return cfg.train.dtype == DType.bf16 and cfg.train.master_dtype == DType.fp32


def validate_precision(cfg: RunConfig, d: Degrees) -> None:
    """train.dtype / train.master_dtype and the ZeRO stage against pipeline and experts (what the engine can run)."""
    t = cfg.train
    validate_engine_support(zero_stage=d.zero_stage, pp=d.pp, ep=d.ep, num_experts=cfg.moe.num_experts,
                            dtype=t.dtype.value, master_dtype=t.master_dtype.value,
                            overlap_optimizer=t.overlap_optimizer)


def validate_engine_support(*, zero_stage: int, pp: int, ep: int, num_experts: int, dtype: str, master_dtype: str,
                            overlap_optimizer: bool = False) -> None:
    """What DeepSpeed and hpframe's engine can run: the ZeRO stage against pipeline and experts, and
    train.dtype / train.master_dtype against both. The planner checks every plan with it
    (``validate_precision``); ``plan.deepspeed_config`` checks the plan it is handed again."""
    if zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"parallel.zero_stage={zero_stage} must be 0, 1, 2 or 3", key="parallel.zero_stage",
                        values={"parallel.zero_stage": zero_stage})
    for key, value in (("train.dtype", dtype), ("train.master_dtype", master_dtype)):
        if value not in ("fp32", "bf16"):
            raise PlanError(f"{key}={value!r} must be fp32 or bf16", key=key, values={key: value})
    if ep > 1 and zero_stage == 3:
        raise PlanError(
            f"parallel.ep={ep} with parallel.zero_stage=3: DeepSpeed does not support MoE with ZeRO-3; use zero_stage 0-2",
            key="parallel.ep, parallel.zero_stage",
            values={"parallel.ep": ep, "parallel.zero_stage": 3},
        )
    if num_experts > 0 and zero_stage == 3:
        raise PlanError(
            f"moe.num_experts={num_experts} with parallel.zero_stage=3: DeepSpeed does not support MoE with ZeRO-3",
            key="moe.num_experts, parallel.zero_stage",
            values={"moe.num_experts": num_experts, "parallel.zero_stage": 3},
        )
    if pp > 1 and zero_stage >= 2:
        raise PlanError(
            f"parallel.pp={pp} with parallel.zero_stage={zero_stage}: DeepSpeed's pipeline engine supports ZeRO stages 0 and 1 only",
            key="parallel.pp, parallel.zero_stage",
            values={"parallel.pp": pp, "parallel.zero_stage": zero_stage},
        )
    _validate_master_dtype(zero_stage=zero_stage, pp=pp, dtype=dtype, master=master_dtype,
                           overlap_optimizer=overlap_optimizer)


def _validate_master_dtype(*, zero_stage: int, pp: int, dtype: str, master: str, overlap_optimizer: bool) -> None:
    if master == "bf16" and dtype != "bf16":
        raise PlanError(f"train.master_dtype=bf16 needs train.dtype=bf16 (got train.dtype={dtype})",
                        key="train.master_dtype, train.dtype", values={"train.master_dtype": master, "train.dtype": dtype})
    if dtype == "bf16" and master == "fp32" and zero_stage == 0:
        raise PlanError(
            "train.dtype=bf16 with train.master_dtype=fp32 and parallel.zero_stage=0: fp32 master weights live in "
            "DeepSpeed's BF16/ZeRO optimizers; use parallel.zero_stage=1 (also at dp=1) or train.master_dtype=bf16",
            key="train.master_dtype, parallel.zero_stage", values={"train.master_dtype": master, "parallel.zero_stage": 0})
    if master == "bf16" and zero_stage == 3:
        raise PlanError(
            "train.master_dtype=bf16 with parallel.zero_stage=3: bf16 master weights run with ZeRO stages 0-2",
            key="train.master_dtype, parallel.zero_stage", values={"train.master_dtype": master, "parallel.zero_stage": 3})
    if overlap_optimizer and (zero_stage != 0 or pp > 1):
        raise PlanError(
            f"train.overlap_optimizer=true with parallel.zero_stage={zero_stage} and parallel.pp={pp}: the "
            "update overlaps the next forward only when hpframe's AdamW updates the parameters in place, "
            "i.e. parallel.zero_stage=0 and parallel.pp=1",
            key="train.overlap_optimizer, parallel.zero_stage, parallel.pp",
            values={"train.overlap_optimizer": True, "parallel.zero_stage": zero_stage, "parallel.pp": pp})
    if master == "bf16" and zero_stage == 0 and pp > 1:
        raise PlanError(
            f"train.master_dtype=bf16 with parallel.zero_stage=0 and parallel.pp={pp}: the plain bf16 update runs "
            "without pipeline parallelism; use parallel.zero_stage=1",
            key="train.master_dtype, parallel.pp", values={"train.master_dtype": master, "parallel.pp": pp})


def validate_model_build(model: ModelConfig, moe: MoEConfig, routing_groups: int) -> None:
    """Shapes and MoE settings the model cannot be built with. ``build_model`` calls it (models are
    also built without a plan: tests, conversion tools); ``make_plan`` with the plan's routing groups."""
    for key, v in (("model.hidden_size", model.hidden_size), ("model.num_layers", model.num_layers),
                   ("model.num_heads", model.num_heads), ("model.vocab_size", model.vocab_size)):
        if v < 1:
            raise PlanError(f"{key}={v} must be >= 1", key=key, values={key: v})
    if Attention(model.attention) == Attention.gqa and model.head_dim <= 0 and model.hidden_size % model.num_heads:
        raise PlanError(
            f"model.hidden_size={model.hidden_size} is not divisible by model.num_heads={model.num_heads}; set model.head_dim",
            key="model.hidden_size, model.num_heads",
            values={"model.hidden_size": model.hidden_size, "model.num_heads": model.num_heads})
    if moe.num_experts <= 0:
        return
    if not 1 <= moe.top_k <= moe.num_experts:
        raise PlanError(f"moe.top_k={moe.top_k} must be between 1 and moe.num_experts={moe.num_experts}",
                        key="moe.top_k, moe.num_experts", values={"moe.top_k": moe.top_k, "moe.num_experts": moe.num_experts})
    if moe.moe_layer_freq < 1:
        raise PlanError(f"moe.moe_layer_freq={moe.moe_layer_freq} must be >= 1", key="moe.moe_layer_freq",
                        values={"moe.moe_layer_freq": moe.moe_layer_freq})
    if routing_groups < 1 or moe.num_experts % routing_groups:
        raise PlanError(
            f"moe.num_experts={moe.num_experts} must be divisible by the routing groups ({routing_groups}; "
            "moe.num_expert_groups unless the runtime passes its node count)",
            key="moe.num_experts, moe.num_expert_groups",
            values={"moe.num_experts": moe.num_experts, "routing_groups": routing_groups})
    _validate_routing(moe, routing_groups)


def _validate_routing(moe: MoEConfig, routing_groups: int) -> None:
    m = moe.max_nodes_per_token
    if m < 0:
        raise PlanError(f"moe.max_nodes_per_token={m} must be >= 0 (0 = no node limit)",
                        key="moe.max_nodes_per_token", values={"moe.max_nodes_per_token": m})
    reach = m * (moe.num_experts // routing_groups)
    if 0 < m < routing_groups and reach < moe.top_k:
        raise PlanError(
            f"moe.max_nodes_per_token={m} groups of {moe.num_experts // routing_groups} experts hold {reach} experts, "
            f"fewer than moe.top_k={moe.top_k}",
            key="moe.top_k, moe.max_nodes_per_token",
            values={"moe.top_k": moe.top_k, "moe.max_nodes_per_token": m, "reachable_experts": reach})
    if not moe.dropless and (moe.capacity_factor <= 0 or moe.eval_capacity_factor <= 0):
        raise PlanError(
            f"moe.capacity_factor={moe.capacity_factor} and moe.eval_capacity_factor={moe.eval_capacity_factor} "
            "must be positive when moe.dropless is false",
            key="moe.capacity_factor, moe.eval_capacity_factor",
            values={"moe.capacity_factor": moe.capacity_factor, "moe.eval_capacity_factor": moe.eval_capacity_factor})
