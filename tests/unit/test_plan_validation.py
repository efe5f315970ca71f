"""Every refused combination raises PlanError whose key names the config keys and whose message
carries the numbers; settings that do nothing produce warnings. Configs are composed from the
debug recipes (cpu cluster: world size = tp*pp*dp) or a full-scale recipe, then overridden. No processes."""

from __future__ import annotations

import pytest

from hpframe.plan import PlanError, make_plan
from hpframe.plan.memory import GIB

CASES = [
    # (id, overrides, key fragment, message fragments)
    ("tp_heads", ["recipe=mixtral_debug", "parallel.tp=3"], "model.num_heads", ["parallel.tp=3", "model.num_heads=4"]),
    ("tp_kv_heads", ["recipe=mixtral_debug", "parallel.tp=4"], "model.num_kv_heads", ["parallel.tp=4", "model.num_kv_heads=2"]),
    ("experts_over_ep", ["recipe=mixtral_debug", "parallel.dp=3", "parallel.ep=3"], "parallel.ep", ["moe.num_experts=8", "parallel.ep=3"]),
    ("world_size", ["recipe=mixtral_debug", "cluster=h200x8", "parallel.tp=2", "parallel.pp=2", "parallel.dp=4"], "parallel.dp",
     ["2 * 2 * 4 = 16", "world size 8"]),
    ("tp_pp_world", ["recipe=mixtral_debug", "cluster=h200x8", "parallel.tp=3"], "parallel.tp", ["3 * 1 = 3", "world size 8"]),
    ("ep_divides_dp", ["recipe=mixtral_debug", "parallel.dp=4", "parallel.ep=3"], "parallel.ep", ["parallel.ep=3", "parallel.dp=4"]),
    ("max_nodes", ["recipe=deepseek_debug", "moe.max_nodes_per_token=5"], "moe.max_nodes_per_token", ["max_nodes_per_token=5", "4 routing groups"]),
    ("top_k_experts", ["recipe=mixtral_debug", "moe.top_k=9"], "moe.top_k", ["moe.top_k=9", "moe.num_experts=8"]),
    ("top_k_reachable", ["recipe=deepseek_debug", "moe.max_nodes_per_token=1", "moe.top_k=5"], "moe.top_k",
     ["moe.top_k=5", "4 experts reachable", "max_nodes_per_token=1"]),
    ("pp_layers", ["recipe=mixtral_debug", "parallel.pp=5"], "parallel.pp", ["parallel.pp=5", "model.num_layers=4"]),
    ("global_batch", ["recipe=mixtral_debug", "parallel.dp=2", "parallel.global_batch_size=20"], "parallel.global_batch_size",
     ["global_batch_size=20", "8 * 2 = 16"]),
    ("global_batch_accum", ["recipe=mixtral_debug", "parallel.global_batch_size=32", "parallel.grad_accum=3"], "parallel.grad_accum",
     ["global_batch_size=32", "8 * 1 * 3 = 24"]),
    ("ep_zero3", ["recipe=mixtral_debug", "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=3"], "parallel.zero_stage",
     ["parallel.ep=2", "zero_stage=3", "ZeRO-3"]),
    ("moe_zero3", ["recipe=mixtral_debug", "parallel.dp=2", "parallel.zero_stage=3"], "parallel.zero_stage", ["moe.num_experts=8", "zero_stage=3"]),
    ("pp_zero2", ["recipe=gpt_debug", "parallel.pp=2", "parallel.zero_stage=2"], "parallel.zero_stage", ["parallel.pp=2", "zero_stage=2"]),
    ("vocab_tp", ["recipe=gpt_debug", "parallel.tp=2", "model.vocab_size=2049"], "model.vocab_size", ["parallel.tp=2", "model.vocab_size=2049"]),
    ("seq_len", ["recipe=mixtral_debug", "data.seq_len=1024"], "data.seq_len", ["data.seq_len=1024", "model.max_seq_len=512"]),
    ("kv_heads_divide", ["recipe=mixtral_debug", "model.num_kv_heads=3"], "model.num_kv_heads", ["model.num_kv_heads=3", "model.num_heads=4"]),
    ("layout_sum", ["recipe=mixtral_debug", "parallel.pp=2", "parallel.pipeline_layout=[1,2]"], "parallel.pipeline_layout",
     ["[1, 2]", "parallel.pp=2", "model.num_layers=4", "summing to 3"]),
    ("layout_len", ["recipe=mixtral_debug", "parallel.pp=2", "parallel.pipeline_layout=[1,1,2]"], "parallel.pipeline_layout", ["3 entries"]),
    ("layout_zero", ["recipe=mixtral_debug", "parallel.pp=2", "parallel.pipeline_layout=[0,4]"], "parallel.pipeline_layout", ["each >= 1"]),
    ("axis_order", ["recipe=mixtral_debug", "parallel.axis_order=pp-dp"], "parallel.axis_order", ["'pp-dp'"]),
    ("lr_inf", ["recipe=mixtral_debug", "train.lr=inf"], "train.lr", ["train.lr=inf must be a finite number"]),
    ("min_lr_nan", ["recipe=mixtral_debug", "train.min_lr=nan"], "train.min_lr", ["train.min_lr=nan must be a finite number"]),
    ("rope_inf", ["recipe=mixtral_debug", "model.rope_theta=inf"], "model.rope_theta", ["model.rope_theta=inf"]),
    ("steps_negative", ["recipe=mixtral_debug", "train.steps=-1"], "train.steps", ["train.steps=-1 must be >= 1"]),
    ("lr_negative", ["recipe=mixtral_debug", "train.lr=-0.001"], "train.lr", ["train.lr=-0.001 must be >= 0"]),
    ("warmup_negative", ["recipe=mixtral_debug", "train.warmup_steps=-5"], "train.warmup_steps", ["train.warmup_steps=-5 must be >= 0"]),
    ("interval_negative", ["recipe=mixtral_debug", "checkpoint.interval=-2"], "checkpoint.interval", ["checkpoint.interval=-2 must be >= 0"]),
    ("keep_last_negative", ["recipe=mixtral_debug", "checkpoint.keep_last=-1"], "checkpoint.keep_last", ["checkpoint.keep_last=-1 must be >= 0"]),
    ("eval_interval_negative", ["recipe=mixtral_debug", "train.eval_interval=-1"], "train.eval_interval", ["train.eval_interval=-1"]),
    ("log_interval_zero", ["recipe=mixtral_debug", "train.log_interval=0"], "train.log_interval", ["train.log_interval=0 must be >= 1"]),
    ("grace_zero", ["recipe=mixtral_debug", "checkpoint.preempt_grace_s=0"], "checkpoint.preempt_grace_s",
     ["checkpoint.preempt_grace_s=0.0 must be > 0"]),
    ("beta2_one", ["recipe=mixtral_debug", "train.beta2=1.0"], "train.beta2", ["train.beta2=1.0 must be < 1"]),
    ("zero_stage", ["recipe=mixtral_debug", "parallel.zero_stage=4"], "parallel.zero_stage", ["parallel.zero_stage=4"]),
    ("profile_negative", ["recipe=mixtral_debug", "train.profile_from_step=-2"], "train.profile_from_step",
     ["train.profile_from_step=-2"]),
    ("profile_steps", ["recipe=mixtral_debug", "train.profile_from_step=2", "train.profile_num_steps=0"],
     "train.profile_num_steps", ["train.profile_num_steps=0"]),
    ("master_needs_bf16", ["recipe=mixtral_debug", "train.master_dtype=bf16"], "train.master_dtype",
     ["train.master_dtype=bf16", "train.dtype=fp32"]),
    ("bf16_zero0", ["recipe=mixtral_debug", "train.dtype=bf16", "parallel.zero_stage=0"], "parallel.zero_stage",
     ["train.master_dtype=fp32", "parallel.zero_stage=0", "zero_stage=1"]),
    ("bf16_master_zero3", ["recipe=gpt_debug", "parallel.dp=2", "train.dtype=bf16", "train.master_dtype=bf16",
                           "parallel.zero_stage=3"], "train.master_dtype", ["parallel.zero_stage=3"]),
    ("bf16_plain_pp", ["recipe=mixtral_debug", "parallel.pp=2", "train.dtype=bf16", "train.master_dtype=bf16",
                       "parallel.zero_stage=0"], "parallel.pp", ["parallel.pp=2", "zero_stage=0"]),
    ("overlap_zero1", ["recipe=mixtral_debug", "train.overlap_optimizer=true", "parallel.zero_stage=1"],
     "train.overlap_optimizer", ["parallel.zero_stage=1", "parallel.pp=1", "zero_stage=0"]),
    ("overlap_pp", ["recipe=mixtral_debug", "parallel.pp=2", "train.overlap_optimizer=true", "parallel.zero_stage=0"],
     "parallel.pp", ["parallel.pp=2", "parallel.zero_stage=0"]),
    ("memory", ["recipe=mixtral_8x7b", "cluster=h200x1", "parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "parallel.global_batch_size=-1"],
     "cluster.gpu_memory_gb", ["cluster.gpu_memory_gb=139", "GiB per GPU", "plan.memory_check=false",
                               "no layout of this world size fits: use more GPUs"]),
]


@pytest.mark.parametrize("overrides,key,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_with_key_and_numbers(compose_cfg, overrides: list[str], key: str, fragments: list[str]) -> None:
    cfg = compose_cfg(*overrides)
    with pytest.raises(PlanError) as info:
        make_plan(cfg)
    err = info.value
    assert key in err.key, (err.key, str(err))
    for frag in fragments:
        assert frag in str(err), (frag, str(err))
    assert isinstance(err, ValueError) and err.values


def test_memory_refusal_names_settings_that_fit(compose_cfg) -> None:
    """mixtral_8x7b at tp1 pp1 ep1 on 8 H200s plans 445.4 GiB per GPU: the refusal names layouts of the same
    8 GPUs that fit 139 GB, and each of them, added as overrides, plans without a refusal."""
    too_big = ("recipe=mixtral_8x7b", "cluster=h200x8", "parallel.tp=1", "parallel.pp=1", "parallel.ep=1")
    with pytest.raises(PlanError) as info:
        make_plan(compose_cfg(*too_big))
    err, msg = info.value, str(info.value)
    assert isinstance(err, ValueError) and err.key == "cluster.gpu_memory_gb, plan.memory_check"
    assert msg.startswith("estimated memory of pipeline stage 0 is 445.4 GiB per GPU (weights 87.0, gradients 261.0, "
                          "optimizer 65.2, activations 32.2) > cluster.gpu_memory_gb=139 (tp=1 pp=1 dp=8 ep=1 "
                          "zero_stage=1 recompute=none); settings that fit: ")
    keys = err.values["settings_that_fit"]
    assert keys and "settings that fit: " + "; ".join(keys) + " (" in msg
    assert "parallel.ep=8 parallel.recompute=selective" in keys
    assert msg.endswith("plan.suggest=true plan.dry_run=true plan.memory_check=false lists more), "
                        "or set plan.memory_check=false to plan it anyway")
    for option in keys:
        plan = make_plan(compose_cfg(*too_big, *option.split()))  # memory_check on: raises if it does not fit
        assert plan.world_size == 8 and plan.memory.total <= 139 * GIB


def test_memory_check_off_turns_refusal_into_warning(compose_cfg) -> None:
    cfg = compose_cfg("recipe=mixtral_8x7b", "cluster=h200x1", "parallel.tp=1", "parallel.pp=1", "parallel.ep=1",
                      "parallel.global_batch_size=-1", "plan.memory_check=false")
    plan = make_plan(cfg)
    assert plan.memory is not None and plan.memory.total > plan.memory.device_bytes
    assert any(w.startswith("OUT OF MEMORY") and "cluster.gpu_memory_gb=139" in w for w in plan.warnings)


@pytest.mark.parametrize(
    "overrides,fragment",
    [
        (["recipe=gpt_debug", "parallel.sequence_parallel=true"], "sequence_parallel=true has no effect with parallel.tp=1"),
        (["recipe=gpt_debug", "parallel.dp=2", "parallel.zero_stage=1", "parallel.dp=1"], "zero_stage=1 has no effect with dp=1"),
        (["recipe=gpt_debug", "moe.num_shared_experts=1"], "num_shared_experts=1 has no effect"),
        (["recipe=mixtral_debug", "moe.num_expert_groups=2"], "num_expert_groups=2 has no effect with moe.max_nodes_per_token=0"),
        (["recipe=deepseek_debug", "moe.max_nodes_per_token=4"], "max_nodes_per_token=4 equals the number of routing groups"),
        (["recipe=mixtral_debug", "moe.dropless=true", "moe.capacity_factor=2.0"], "capacity_factor=2.0 has no effect"),
        (["recipe=mixtral_debug", "parallel.pp=2", "parallel.grad_accum=1"], "grad_accum=1 < parallel.pp=2"),
        (["recipe=mixtral_debug", "model.first_k_dense=4"], "no block is MoE"),
        (["recipe=gpt_debug", "parallel=tp2_pp2_dp2"], "parallel.ep=2 has no effect with moe.num_experts=0"),
        (["recipe=gpt_debug", "train.steps=5", "train.profile_from_step=4"], "ends at step 6 > train.steps=5"),
    ],
)
def test_warnings_for_settings_without_effect(compose_cfg, overrides: list[str], fragment: str) -> None:
    plan = make_plan(compose_cfg(*overrides))
    assert any(fragment in w for w in plan.warnings), plan.warnings
