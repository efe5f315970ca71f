"""End to end on this machine: ``python launch.py`` as a subprocess on the debug recipes (CPU, gloo).

Compared: the 4-process run (dp4 = edp2 x ep2, ZeRO-1) with the single-process run of the same global
batch (grad_accum 4): the step-1 loss (same initial weights, same 32 sequences) to 1e-5 and the
following steps closely; a run resumed from the step-4 checkpoint with the uninterrupted run's steps
5-8 (and checkpoint.resume=auto continuing a finished run after its newest checkpoint); the logged
learning rates with the schedule's formula. Also checked: the loss falls by a real margin,
metrics.jsonl has every key on every step, evaluations and checkpoints happen where configured,
non-finite losses stop the run with exit code 3, user errors exit with 2, tokenized data trains
(dense recipe: MoE figures 0.0), ``--cfg job`` and a ``-m`` dry-run sweep work.
CPU only; each launch takes 5-40 s on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpframe.train.metrics import STEP_KEYS
from hpframe.train.schedule import lr_at

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# 8 smoke steps (lr 3e-3, warmup 2, min_lr 3e-4) of 4 x 8 sequences of 128 tokens
# and an evaluation of 4 held-out micro-batches (split over dp) every 4 steps
COMMON = ["train=smoke", "train.steps=8", "train.eval_interval=4", "train.eval_steps=4", "checkpoint.interval=4",
          "train.progress=false"]


def launch(args: list[str], run_dir: Path, *, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run launch.py with ``args`` into ``run_dir``; stdout and stderr captured as text."""
    # one OpenMP thread per process: on a shared 2-core machine more threads only wait on each other
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "launch.py"), *args, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of a run's metrics.jsonl."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval_loss" in r]


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-4000:]}\nSTDERR\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("single")
    proc = launch([*COMMON, "parallel.grad_accum=4"], run_dir)
    check_ok(proc)
    return run_dir, proc


def test_single_process_trains(single_run):
    run_dir, proc = single_run
    steps, evals = records(run_dir)
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert set(STEP_KEYS) <= r.keys(), set(STEP_KEYS) - r.keys()
        assert all(r[k] is not None and math.isfinite(r[k]) for k in STEP_KEYS if k != "skipped")
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, lr=3e-3, min_lr=3e-4, warmup_steps=2, total_steps=8))
        assert r["loss"] == pytest.approx(r["lm_loss"] + r["aux_loss"], rel=1e-6)
        assert r["aux_loss"] > 0 and r["expert_load_cv"] > 0 and r["dropped_token_frac"] == 0.0  # dropless MoE
        assert r["ep_load_imbalance"] == 1.0  # one process: no expert parallelism
        assert r["consumed_tokens"] == r["step"] * 32 * 128 and not r["skipped"]
    assert steps[0]["loss"] == pytest.approx(math.log(2048), abs=0.3)  # random init: uniform over the vocabulary
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert [e["step"] for e in evals] == [4, 8] and evals[1]["eval_loss"] < evals[0]["eval_loss"] < steps[0]["loss"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000008"]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    out = proc.stdout
    order = [out.index(s) for s in ("INFO plan:", "INFO groups:", "INFO model:", "INFO engine:", "INFO data:", "INFO step 1/8")]
    assert order == sorted(order), "build steps not logged in order"


def test_resume_continues_where_the_checkpoint_left_off(single_run, tmp_path):
    ref_dir, _ = single_run
    ckpt = ref_dir / "checkpoints" / "step_00000004"
    proc = launch([*COMMON, "parallel.grad_accum=4", f"checkpoint.resume={ckpt}"], tmp_path)
    check_ok(proc)
    assert f"resumed from {ckpt}: step 4" in proc.stdout
    resumed, _ = records(tmp_path)
    ref, _ = records(ref_dir)
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    for a, b in zip(resumed, ref[4:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["consumed_tokens"] == b["consumed_tokens"]
    # checkpoint.resume=auto (the default) in a copy of the finished run: continues after its newest checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(ref_dir, copy)
    more = launch([*COMMON, "parallel.grad_accum=4", "train.steps=10"], copy)
    check_ok(more)
    assert f"resumed from {copy / 'checkpoints' / 'step_00000008'}: step 8" in more.stdout
    assert [r["step"] for r in records(copy)[0]] == list(range(1, 11))
    # a checkpoint of another model shape is refused as a user error, before any step
    other = launch([*COMMON, "parallel.grad_accum=4", "model.num_layers=3", f"checkpoint.resume={ckpt}"], tmp_path / "other")
    assert other.returncode == 2 and f"{ckpt}" in other.stdout + other.stderr
    assert "INFO step 1/" not in other.stdout and "INFO step 5/" not in other.stdout


@pytest.mark.dist
def test_four_processes_match_single_process(single_run, tmp_path):
    ref_dir, _ = single_run
    proc = launch([*COMMON, "parallel.dp=4", "parallel.ep=2", "parallel.zero_stage=1"], tmp_path)
    check_ok(proc)
    assert "starting 4 local processes" in proc.stdout
    steps, evals = records(tmp_path)
    ref, ref_evals = records(ref_dir)
    assert [r["step"] for r in steps] == list(range(1, 9))
    for r in steps:
        assert set(STEP_KEYS) <= r.keys() and all(r[k] is not None for k in STEP_KEYS)
        assert 1.0 <= r["ep_load_imbalance"] <= 2.0  # ep=2: the busier rank's share over the mean
    assert max(r["ep_load_imbalance"] for r in steps) > 1.0  # computed, not the dense default
    assert steps[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-5)
    for a, b in zip(steps, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    for a, b in zip(evals, ref_evals):  # the same 4 held-out micro-batches: 1 per dp rank vs 4 on one rank
        assert a["step"] == b["step"] and a["eval_loss"] == pytest.approx(b["eval_loss"], rel=2e-3)
    assert (tmp_path / "checkpoints" / "step_00000008").is_dir()


@pytest.mark.dist
def test_nonfinite_losses_stop_the_run(tmp_path):
    # lr 1e6 blows the weights up after the first update; later steps have NaN gradients and are skipped.
    # Two processes: the workers' exit code 3 must reach the shell through the local launcher.
    proc = launch(["train=smoke", "train.steps=10", "train.lr=1e6", "train.min_lr=1e6", "train.max_nonfinite_steps=2",
                   "parallel.dp=2", "checkpoint=off", "train.progress=false"], tmp_path)
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 consecutive steps with a non-finite loss or gradients (train.max_nonfinite_steps=2)" in proc.stdout + proc.stderr
    steps, _ = records(tmp_path)
    assert len(steps) < 10 and [r["skipped"] for r in steps[-2:]] == [True, True]


def test_user_error_exit_code(tmp_path):
    proc = launch(["parallel.dp=2", "parallel.ep=3"], tmp_path)
    assert proc.returncode == 2
    assert "parallel.ep" in proc.stderr and "Traceback" not in proc.stderr


def test_tokenized_data_trains(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i % 37} says {'abc' * (i % 5)} and {i % 11}\n" for i in range(4000)))
    data = tmp_path / "data"
    prep = subprocess.run([sys.executable, "-m", "hpframe.data.prepare", str(text), "--out", str(data), "--vocab-size", "400"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    small = launch(["data=tokenized", f"data.path={data}", "data.seq_len=64", f"model.vocab_size={vocab - 1}"], tmp_path / "bad")
    assert small.returncode == 2 and f"model.vocab_size>={vocab}" in small.stdout + small.stderr
    # the dense recipe here: its MoE figures are plain zeros, not NaN
    proc = launch(["recipe=gpt_debug", "train=smoke", "train.steps=6", "data=tokenized", f"data.path={data}",
                   "data.seq_len=64", "checkpoint=off", "train.progress=false"], tmp_path / "run")
    check_ok(proc)
    steps, _ = records(tmp_path / "run")
    assert len(steps) == 6 and steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert all(r["aux_loss"] == 0.0 and r["expert_load_cv"] == 0.0 and r["dropped_token_frac"] == 0.0 for r in steps)


def test_cfg_job_and_multirun_dry_run(tmp_path):
    env = dict(os.environ)
    cfg = subprocess.run([sys.executable, "launch.py", "--cfg", "job", "recipe=deepseek_debug"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert cfg.returncode == 0 and "name: deepseek_debug" in cfg.stdout
    sweep = subprocess.run([sys.executable, "launch.py", "-m", "plan.dry_run=true", "parallel.dp=1,2",
                            f"hydra.sweep.dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert not [p.name for p in tmp_path.iterdir() if p.is_dir()]  # dry runs leave no job directory
    assert sweep.stdout.count("mixtral_debug on cpu") == 2
