"""ParallelPlan -> DeepSpeed config dict. Pure (no torch, no DeepSpeed): every value explicit, never "auto".

DeepSpeed's non-strict config parsing silently replaces values it does not understand (``"auto"``
included) by defaults, so the dict written here spells out every setting hpframe relies on, and
``tests/unit/test_deepspeed_config.py`` parses it with DeepSpeed's own config models.

Choices that are not simply copied from the plan:
  * ``gradient_clipping`` is 0: the engine computes the true global gradient norm itself (experts
    counted once across EP, TP shards and pipeline stages combined) and clips before the optimizer
    step; see hpframe/engine/step.py.
  * bf16 whenever ``train.dtype=bf16`` (except the pure-bf16 ZeRO-0 case below), on CUDA and on CPU alike (CPU bf16 is slow but lets the CPU tests
    cover DeepSpeed's bf16 optimizers); the debug recipes choose fp32.
  * ``train.master_dtype=bf16``: ZeRO 1/2 get DeepSpeed's bf16 master weights and moments; ZeRO 0 gets
    DeepSpeed's bf16 switched off (the weights are bf16 already, cast by hpframe), which leaves the
    client fused AdamW alone on the bf16 weights: no fp32 copies and no extra passes (measured on one
    H200 in docs/performance.md, section 6).
  * ``zero_allow_untested_optimizer``: the optimizer is a client ``torch.optim.AdamW``.
  * ZeRO-2/3 with pipeline parallelism, and ZeRO-3 with experts, are refused: DeepSpeed's pipeline
    engine supports ZeRO 0-1 only, and its MoE support stops at ZeRO-2.
"""

from __future__ import annotations

from typing import Any

from hpframe.plan.validate import validate_engine_support

BUCKET_ELEMENTS = 500_000_000
"""ZeRO reduce / all-gather bucket size in elements (DeepSpeed's own default, written out)."""


def deepspeed_config(plan: Any, *, dtype: str, device: str, master_dtype: str = "fp32",
                     steps_per_print: int = 1_000_000_000) -> dict[str, Any]:
    """The DeepSpeed config of ``plan``.

    ``dtype`` is ``train.dtype`` ("fp32" or "bf16"), ``master_dtype`` is ``train.master_dtype``;
    ``device`` is the resolved device ("cpu" or "cuda"). Raises PlanError (a ValueError) for combinations
    DeepSpeed does not support: the planner's own rules (``plan.validate.validate_engine_support``).
    """
    validate_engine_support(zero_stage=plan.zero_stage, pp=plan.pp, ep=plan.ep,
                            num_experts=plan.experts.num_experts if plan.experts is not None else 0,
                            dtype=dtype, master_dtype=master_dtype)
    pure_bf16 = dtype == "bf16" and master_dtype == "bf16" and plan.zero_stage == 0
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} must be cpu or cuda")
    if plan.micro_batch_size * plan.grad_accum * plan.dp != plan.global_batch_size:
        raise ValueError(
            f"parallel.global_batch_size={plan.global_batch_size} != micro_batch_size {plan.micro_batch_size} "
            f"x grad_accum {plan.grad_accum} x dp {plan.dp}"
        )
    # Pure bf16 under ZeRO 0: hpframe casts the weights itself and DeepSpeed runs as in fp32 (no
    # precision wrapper), so the client AdamW updates the bf16 weights in place, bf16 moments and all.
    bf16 = dtype == "bf16" and not pure_bf16
    cfg: dict[str, Any] = {
        "train_batch_size": plan.global_batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": 0.0,
        "steps_per_print": steps_per_print,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every forward's start and step's end;
        # hpframe times steps itself, and those two waits left the GPU idle while the host prepared the
        # next step (docs/performance.md, section 7)
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "zero_allow_untested_optimizer": True,
        # check_grad_overflow off: the engine's guard checks the global norm and the losses itself
        "bf16": {"enabled": bf16, "check_grad_overflow": False},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": plan.zero_stage,
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_scatter": True,
            "reduce_bucket_size": BUCKET_ELEMENTS,
            "allgather_bucket_size": BUCKET_ELEMENTS,
            "round_robin_gradients": False,
        },
    }
    if bf16 and master_dtype == "bf16":
        # bf16 everywhere: DeepSpeed's ZeRO optimizer with bf16 master weights, gradients and moments
        cfg["bf16"].update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
        cfg["data_types"] = {"grad_accum_dtype": "bf16"}
    elif bf16:
        # Accumulate gradients across micro-batches in fp32, not in the bf16 parameter dtype.
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if plan.pp > 1:
        cfg["pipeline"] = {
            "stages": plan.pp,
            "partition": "uniform",  # unused: hpframe.parallel.pipeline sets the plan's partition itself
            "seed_layers": False,
            "activation_checkpoint_interval": 0,
            # TP ranks hold identical activations; splitting them for p2p is an optimization we skip
            "pipe_partitioned": False,
            "grad_partitioned": False,
        }
    return cfg


def find_auto(value: Any, path: str = "") -> list[str]:
    """Paths of every ``"auto"`` string inside a (nested) config; empty when there is none."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in find_auto(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in find_auto(v, f"{path}[{i}]")]
    return [path] if isinstance(value, str) and value.lower() == "auto" else []
