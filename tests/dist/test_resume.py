"""Exact resume through the training loop on CPU (gloo, fp32), with 1, 2 and 4 processes.

Compared: an uninterrupted run of N + M steps that saves at step N, and a second run, in fresh engines
whose weights were initialized with ANOTHER seed, resumed from that step-N checkpoint. The resumed
run's losses of steps N+1..N+M equal the uninterrupted run's bit for bit, and its final checkpoint
(fp32 weights, Adam moments and steps, aux-loss-free router biases) equals the uninterrupted run's
final checkpoint tensor for tensor, bit for bit. Layouts: one process (mixtral_debug); edp2 x ep2
(4 processes) with ZeRO-1 and asynchronous saves (deepseek_debug, bias balancing on); pp2 with ZeRO-1
(mixtral_debug); the dense gpt_debug with pp2 (tied embedding held by both stages) and dp2 with ZeRO-2;
dp2 = ep2 with ZeRO-2 (mixtral_debug, 2 processes); and bf16 at dp2 = ep2 through each optimizer path
(BF16_Optimizer, ZeRO-2, bf16 master weights under ZeRO-1 and ZeRO-0).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import compose_run_config  # noqa: E402
from hpframe.checkpoint.portable import PortableCheckpoint  # noqa: E402
from hpframe.testing.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.dist
N, M = 3, 3
SMALL = ["train=smoke", f"train.steps={N + M}", "parallel.micro_batch_size=2", "parallel.grad_accum=2", "data.seq_len=32",
         "data.num_synthetic_tokens=60000", "train.progress=false", "train.tensorboard=false", "train.eval_steps=4"]


def train_in_process(rank: int, world_size: int, cfg) -> list[float]:
    """run.train_main's build sequence on an existing process group; returns the step losses."""
    from hpframe.data import build_data
    from hpframe.engine import build_engine
    from hpframe.engine.ds_env import prepare_deepspeed
    from hpframe.engine.moe_bridge import release_expert_groups
    from hpframe.models import build_model
    from hpframe.parallel import init_distributed, parallelize
    from hpframe.plan import make_plan
    from hpframe.train.loop import train

    prepare_deepspeed()
    plan = make_plan(cfg, world_size)
    groups = init_distributed(plan)
    model = build_model(cfg.model, cfg.moe, routing_groups=plan.experts.routing_groups if plan.experts else None)
    model.init_weights(cfg.train.seed)
    model = parallelize(model, plan, groups, sequence_parallel=cfg.parallel.sequence_parallel, recompute=cfg.parallel.recompute)
    engine = build_engine(model, plan, groups, cfg)
    data = build_data(cfg, plan, rank)
    result = train(engine, data, plan, cfg)
    release_expert_groups(plan)
    return [r["loss"] for r in result.history]


def _runs(rank: int, world_size: int, cfgs: list) -> list[list[float]]:
    return [train_in_process(rank, world_size, cfg) for cfg in cfgs]


def resume_pair(tmp_path: Path, overrides: list[str]) -> tuple:
    """(uninterrupted cfg, resumed cfg): the first saves at N and at the end, the second resumes from N."""
    full = compose_run_config(*SMALL, *overrides, f"checkpoint.interval={N}", "checkpoint.keep_last=0", "checkpoint.resume=none")
    full.output_dir = str(tmp_path / "full")
    resumed = compose_run_config(*SMALL, *overrides, "checkpoint.interval=0", "checkpoint.keep_last=0",
                                 f"checkpoint.resume={tmp_path / 'full' / 'checkpoints' / f'step_{N:08d}'}", "train.seed=999")
    resumed.output_dir = str(tmp_path / "resumed")
    return full, resumed


def assert_same_checkpoint(a: Path, b: Path) -> int:
    """Every stored tensor of two portable checkpoints equal bit for bit; returns how many were compared."""
    ca, cb = PortableCheckpoint(a), PortableCheckpoint(b)
    assert set(ca.shapes) == set(cb.shapes)
    assert ca.adam_step == cb.adam_step and ca.adam_step
    for kind, name in ca.shapes:
        x, y = ca.read(name, kind), cb.read(name, kind)
        assert torch.equal(x, y), f"{kind} {name}: max diff {(x - y).abs().max().item()}"
    return len(ca.shapes)


def check_exact_resume(tmp_path: Path, world_size: int, cases: list[list[str]]) -> None:
    """One launch of ``world_size`` processes trains every case's uninterrupted and resumed runs."""
    cfgs = []
    for i, overrides in enumerate(cases):
        cfgs.extend(resume_pair(tmp_path / f"case{i}", overrides))
    results = run_distributed(_runs, world_size, (cfgs,), timeout=180)
    final = f"step_{N + M:08d}"
    for i, overrides in enumerate(cases):
        ref, res = results[0][2 * i], results[0][2 * i + 1]
        assert len(ref) == N + M and len(res) == M
        assert res == ref[N:], f"{overrides}: resumed losses {res} != uninterrupted {ref[N:]}"
        d = tmp_path / f"case{i}"
        count = assert_same_checkpoint(d / "full" / "checkpoints" / final, d / "resumed" / "checkpoints" / final)
        assert count >= 3 * 10  # params and both moments of every tensor


def test_exact_resume_single_process(tmp_path):
    check_exact_resume(tmp_path, 1, [["recipe=mixtral_debug"]])


def test_exact_resume_dp2_ep2_async(tmp_path):
    check_exact_resume(tmp_path, 4, [["recipe=deepseek_debug", "parallel.dp=4", "parallel.ep=2", "parallel.zero_stage=1",
                                      "checkpoint.async_save=true"]])
    bias = PortableCheckpoint(tmp_path / "case0" / "full" / "checkpoints" / f"step_{N + M:08d}").read("layers.1.mlp.router.expert_bias")
    assert bias.abs().sum() > 0  # the aux-loss-free biases moved and were carried through the resume


def test_exact_resume_pp2_dense_and_ep2(tmp_path):
    check_exact_resume(tmp_path, 2, [
        ["recipe=mixtral_debug", "parallel.pp=2", "parallel.dp=1", "parallel.zero_stage=1"],
        ["recipe=gpt_debug", "parallel.pp=2", "parallel.dp=1", "parallel.zero_stage=0"],  # tied embedding on 2 stages
        ["recipe=gpt_debug", "parallel.dp=2", "parallel.zero_stage=2"],
        ["recipe=mixtral_debug", "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=2"],  # dp2 = ep2, edp 1
    ])


def test_exact_resume_bf16_paths(tmp_path):
    """bf16 on CPU, dp2 = ep2: DeepSpeed's BF16_Optimizer (fp32 master, ZeRO-1), ZeRO-2, bf16 master weights
    through DeepSpeed's ZeRO-1 optimizer, and the plain bf16 update (ZeRO 0) all resume bit for bit."""
    bf16 = ["recipe=mixtral_debug", "parallel.dp=2", "parallel.ep=2", "train.dtype=bf16"]
    check_exact_resume(tmp_path, 2, [
        [*bf16, "parallel.zero_stage=1"],
        [*bf16, "parallel.zero_stage=2"],
        [*bf16, "parallel.zero_stage=1", "train.master_dtype=bf16"],
        [*bf16, "parallel.zero_stage=0", "train.master_dtype=bf16"],
    ])
