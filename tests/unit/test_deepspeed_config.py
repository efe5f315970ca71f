"""plan/deepspeed_config.py: the generated dict parses under DeepSpeed's own config models
(DeepSpeedConfig with the batch-size arithmetic, DeepSpeedZeroConfig, DeepSpeedBF16Config), holds no
"auto" anywhere, carries the plan's numbers, and unsupported combinations fail with the config key.
Also the DeepSpeed MoE conventions of engine/moe_bridge.py on real debug models: which parameters
get the expert tags, and the optimizer param groups DeepSpeed receives (no processes)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from hpframe.engine.ds_env import init_deepspeed_comm
from hpframe.plan import PlanError
from hpframe.plan.deepspeed_config import deepspeed_config, find_auto


def _plan(*, dp: int = 2, pp: int = 1, zero: int = 1, mbs: int = 2, ga: int = 3, experts: bool = False) -> SimpleNamespace:
    return SimpleNamespace(
        dp=dp, pp=pp, tp=1, ep=1, zero_stage=zero, micro_batch_size=mbs, grad_accum=ga, global_batch_size=mbs * ga * dp,
        experts=SimpleNamespace(num_experts=8) if experts else None,
    )


class _DataParallelSize:
    """What DeepSpeedConfig asks an mpu for: the data-parallel world size (the plan's dp)."""

    def __init__(self, dp: int) -> None:
        self.dp = dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory: pytest.TempPathFactory):
    """DeepSpeedConfig consults an mpu only under an initialized process group: a 1-rank gloo group."""
    if dist.is_initialized():
        yield
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    init_deepspeed_comm()
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(("pp", "zero"), [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1)])
@pytest.mark.parametrize(("dtype", "device"), [("fp32", "cpu"), ("bf16", "cpu"), ("bf16", "cuda"), ("fp32", "cuda")])
def test_config_parses_under_deepspeed_models(one_process_group, zero: int, dtype: str, device: str, pp: int) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    plan = _plan(dp=4, pp=pp, zero=zero, mbs=2, ga=3)
    if dtype == "bf16" and zero == 0:  # fp32 master weights live in DeepSpeed's ZeRO/BF16 optimizers
        with pytest.raises(PlanError, match="train.master_dtype=fp32 and parallel.zero_stage=0"):
            deepspeed_config(plan, dtype=dtype, device=device)
        return
    cfg = deepspeed_config(plan, dtype=dtype, device=device)
    assert find_auto(cfg) == []
    parsed = DeepSpeedConfig(copy.deepcopy(cfg), mpu=_DataParallelSize(plan.dp))
    assert parsed.train_batch_size == 24
    assert parsed.train_micro_batch_size_per_gpu == 2
    assert parsed.gradient_accumulation_steps == 3
    assert parsed.zero_optimization_stage == zero
    assert parsed.gradient_clipping == 0.0
    assert parsed.bfloat16_config.enabled == (dtype == "bf16")
    assert parsed.float16_config.enabled is False
    assert parsed.zero_allow_untested_optimizer is True
    assert parsed.zero_config.overlap_comm is False and parsed.zero_config.reduce_bucket_size == 500_000_000
    # no device synchronization by DeepSpeed's throughput timer at each forward and step
    assert parsed.timers_config.enabled is False and parsed.timers_config.synchronized is False
    if pp > 1:
        assert parsed.pipeline["pipe_partitioned"] is False and parsed.pipeline["stages"] == pp


def test_batch_arithmetic_is_checked_by_deepspeed(one_process_group) -> None:
    """DeepSpeed itself rejects the dict when its dp differs from the plan's: the numbers are really used."""
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = deepspeed_config(_plan(dp=4), dtype="fp32", device="cpu")
    with pytest.raises(AssertionError, match="train_batch_size"):
        DeepSpeedConfig(cfg, mpu=_DataParallelSize(2))


def test_sub_models_parse_strictly() -> None:
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = deepspeed_config(_plan(zero=2), dtype="bf16", device="cuda")
    zero = DeepSpeedZeroConfig(**cfg["zero_optimization"])
    assert zero.stage == 2 and zero.contiguous_gradients and zero.reduce_scatter and not zero.round_robin_gradients
    assert DeepSpeedBF16Config(**cfg["bf16"]).enabled
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}


@pytest.mark.parametrize("zero", [1, 2])
def test_bf16_master_weights_parse(one_process_group, zero: int) -> None:
    """train.master_dtype=bf16: DeepSpeed's own models read bf16 master weights, moments and accumulation."""
    from deepspeed.runtime.config import DeepSpeedConfig

    plan = _plan(dp=4, zero=zero, mbs=2, ga=3)
    parsed = DeepSpeedConfig(deepspeed_config(plan, dtype="bf16", device="cuda", master_dtype="bf16"),
                             mpu=_DataParallelSize(plan.dp))
    assert parsed.bfloat16_config.bf16_master_weights_and_grads and parsed.bfloat16_config.bf16_optimizer_states
    assert parsed.bfloat16_config.check_grad_overflow is False
    assert parsed.grad_accum_dtype == "bf16"


def test_pure_bf16_under_zero0_runs_deepspeed_in_fp32_mode(one_process_group) -> None:
    """ZeRO 0 + bf16 master: DeepSpeed's bf16 is off (no wrapper optimizer); hpframe casts the weights."""
    from deepspeed.runtime.config import DeepSpeedConfig

    plan = _plan(dp=4, zero=0, mbs=2, ga=3)
    cfg = deepspeed_config(plan, dtype="bf16", device="cuda", master_dtype="bf16")
    parsed = DeepSpeedConfig(copy.deepcopy(cfg), mpu=_DataParallelSize(plan.dp))
    assert not parsed.bfloat16_config.enabled and "data_types" not in cfg


@pytest.mark.parametrize(
    ("kwargs", "dtype", "match"),
    [
        ({"zero": 3}, "bf16", r"train.master_dtype=bf16 with parallel.zero_stage=3"),
        ({"zero": 0, "pp": 2}, "bf16", r"train.master_dtype=bf16 with parallel.zero_stage=0 and parallel.pp=2"),
        ({"zero": 1}, "fp32", r"train.master_dtype=bf16 needs train.dtype=bf16 \(got train.dtype=fp32\)"),
    ],
)
def test_bf16_master_refusals(kwargs: dict, dtype: str, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        deepspeed_config(_plan(**kwargs), dtype=dtype, device="cuda", master_dtype="bf16")


def test_find_auto_reports_paths() -> None:
    assert find_auto({"a": {"b": "auto"}, "c": [1, "AUTO"], "d": "x"}) == ["a.b", "c[1]"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pp": 2, "zero": 2}, r"parallel.pp=2 with parallel.zero_stage=2: DeepSpeed's pipeline engine"),
        ({"zero": 3, "experts": True}, r"moe.num_experts=8 with parallel.zero_stage=3: DeepSpeed does not support MoE"),
        ({"zero": 4}, r"parallel.zero_stage=4 must be"),
    ],
)
def test_refusals(kwargs: dict, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        deepspeed_config(_plan(**kwargs), dtype="fp32", device="cpu")


def test_bad_dtype_and_batch() -> None:
    with pytest.raises(ValueError, match=r"train.dtype='fp16'"):
        deepspeed_config(_plan(), dtype="fp16", device="cpu")
    bad = _plan()
    bad.global_batch_size += 1
    with pytest.raises(ValueError, match=r"parallel.global_batch_size=13"):
        deepspeed_config(bad, dtype="fp32", device="cpu")


def test_moe_conventions_on_a_real_model(compose_cfg) -> None:
    """moe_bridge tags exactly the routed-expert weights (not shared experts or routers) when ep > 1,
    and the optimizer groups put them in DeepSpeed 'moe' groups with decay on matrices only."""
    from deepspeed.moe.utils import is_moe_param

    from hpframe.engine.moe_bridge import expert_group_name, optimizer_param_groups, tag_expert_params
    from hpframe.models import build_model
    from hpframe.plan import make_plan

    cfg = compose_cfg("recipe=deepseek_debug", "parallel.dp=2", "parallel.ep=2")
    plan = make_plan(cfg, 2)
    model = build_model(cfg.model, cfg.moe, routing_groups=plan.experts.routing_groups)
    num_tagged = tag_expert_params(model, plan)
    tagged = {n for n, p in model.named_parameters() if is_moe_param(p)}
    expected = {n for n, _ in model.named_parameters() if ".mlp.experts." in n}
    assert tagged == expected and num_tagged == len(expected) == 2 * len(plan.moe_layers)  # w13, w2
    assert all(p.group_name == expert_group_name(2) == "ep_size_2" for n, p in model.named_parameters() if n in tagged)
    groups = optimizer_param_groups(model, 0.1)
    by_name = {(g["name"], g.get("moe", False), g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_name == {
        ("decay", False, 0.1): sum(1 for n, p in model.named_parameters() if p.ndim >= 2 and n not in tagged),
        ("no_decay", False, 0.0): sum(1 for p in model.parameters() if p.ndim < 2),
        ("ep_size_2", True, 0.1): len(tagged),
    }


def test_no_tags_without_expert_parallelism(compose_cfg) -> None:
    from deepspeed.moe.utils import is_moe_param

    from hpframe.engine.moe_bridge import optimizer_param_groups, tag_expert_params
    from hpframe.models import build_model
    from hpframe.plan import make_plan

    cfg = compose_cfg("recipe=mixtral_debug", "parallel.dp=2")
    plan = make_plan(cfg, 2)
    model = build_model(cfg.model, cfg.moe)
    assert tag_expert_params(model, plan) == 0
    assert not any(is_moe_param(p) for p in model.parameters())
    assert [g["name"] for g in optimizer_param_groups(model, 0.1)] == ["decay", "no_decay"]


def test_prepare_deepspeed_skips_the_shm_op_build() -> None:
    """On CPU: DS_ACCELERATOR=cpu, an extensions cache folder, and DeepSpeed's shm op builder returns None
    (DeepSpeed's "op not available"), so no process start compiles it."""
    import importlib
    import os

    import torch

    from hpframe.engine.ds_env import prepare_deepspeed

    prepare_deepspeed()
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
    assert os.environ["TORCH_EXTENSIONS_DIR"]
    if not torch.cuda.is_available():
        assert os.environ["DS_ACCELERATOR"] == "cpu"
