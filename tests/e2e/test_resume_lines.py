"""Resume and pruning follow ``latest`` and its line: ``launch.py`` as a subprocess, one process, the default
(Mixtral debug) recipe on CPU. Four launches into one run directory, each checking what the one before left:

  1. ``resume=none``: 6 steps, checkpoints at 2, 4, 6 (line A); the reference losses.
  2. a branch: ``resume=.../step_00000002``, 4 steps, ``keep_last=1``: its step-4 save (new line B) replaces
     A's and survives its own pruning although A's step 6 is higher; A's checkpoints are another line's
     and stay. ``latest`` names B's step 4, which exists. Steps 3-4 are marked ``rerun`` in metrics.jsonl.
  3. ``resume=auto`` with a staging directory of a killed save planted and ``keep_last=0``: resumes from
     what ``latest`` names (B's step 4), not from the highest step (A's step 6); steps 5-6 equal the
     reference's bit for bit (B continues A's trajectory) and are marked ``rerun``; the staging
     directory is gone (the learning rate is constant, so a 4-step run follows a 6-step run's path).
  4. every checkpoint truncated: ``resume=auto`` refuses with exit code 2, naming each checkpoint and why,
     and trains nothing (before: a silent restart from step 0).
CPU only; each launch takes 10-30 s on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
COMMON = ["train=smoke", "checkpoint.interval=2", "parallel.micro_batch_size=2", "data.seq_len=32",
          "data.num_synthetic_tokens=50000", "train.progress=false", "train.tensorboard=false", "train.eval_interval=0",
          "train.warmup_steps=0", "train.min_lr=3e-3"]  # a constant lr: runs of different train.steps share a trajectory


def launch(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "launch.py"), *COMMON, *args, f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-4000:]}"
    return out


def step_records(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if "loss" in r]


def test_latest_line_pruning_and_refusal(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ok(launch(["checkpoint.resume=none", "train.steps=6", "checkpoint.keep_last=0"], tmp_path))
    reference = {r["step"]: r["loss"] for r in step_records(tmp_path)}
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]
    line_a = json.loads((ckpts / "step_00000006" / "MANIFEST.json").read_text())["line"]

    out = ok(launch([f"checkpoint.resume={ckpts / 'step_00000002'}", "train.steps=4", "checkpoint.keep_last=1"], tmp_path))
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    branch = json.loads((ckpts / "step_00000004" / "MANIFEST.json").read_text())
    assert branch["line"] != line_a and branch["parent"] == {"line": line_a, "step": 2}
    assert f"resumed from {ckpts / 'step_00000002'}: step 2" in out and f"new line {branch['line']}" in out
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]

    stale = ckpts / ".staging-step_00000005"  # what a save killed before its commit leaves
    (stale / "tensors").mkdir(parents=True)
    (stale / "tensors" / "rank00000.safetensors").write_bytes(b"partial")
    out = ok(launch(["checkpoint.resume=auto", "train.steps=6", "checkpoint.keep_last=0"], tmp_path))
    assert f"resumed from {ckpts / 'step_00000004'}: step 4" in out and "continuing its line" in out
    assert not stale.exists()
    assert json.loads((ckpts / "step_00000006" / "MANIFEST.json").read_text())["line"] == branch["line"]
    records = step_records(tmp_path)
    assert [(r["step"], r.get("rerun", False)) for r in records] == (
        [(s, False) for s in range(1, 7)] + [(3, True), (4, True), (5, True), (6, True)])
    assert [r["loss"] for r in records[-2:]] == [reference[5], reference[6]]

    victims = sorted(ckpts.glob("step_*/tensors/rank00000.safetensors"))
    for f in victims:
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    refused = launch(["checkpoint.resume=auto", "train.steps=8"], tmp_path)
    out = refused.stdout + refused.stderr
    assert refused.returncode == 2, out[-4000:]
    assert f"{ckpts}: 3 checkpoint(s), none usable for resuming" in out
    assert all(f"{f}: " in out for f in victims) and out.count("(truncated?)") >= 3
    assert "checkpoint.resume=none" in out
    assert len(step_records(tmp_path)) == 10  # nothing trained
