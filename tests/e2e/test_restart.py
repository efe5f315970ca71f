"""Crash safety end to end: ``launch.py`` (2 processes, dp2, ZeRO-1) and torchrun as subprocesses on the
Mixtral debug recipe, CPU.

Compared with an uninterrupted run of the same configuration (6 steps, a checkpoint every 2), whose
metrics.jsonl records the training stall ``ckpt_stall_s`` of each of its 3 saves:
  * killed mid-save: rank 0 SIGKILLs itself inside the save of step 4 (files staged, no manifest,
    no commit; HPFRAME_TEST_KILL_IN_SAVE). The staging directory is left, ``latest`` still names
    step 2, and ``checkpoint.resume=auto`` resumes from step 2: steps 3-6 equal the reference's.
  * damaged newest checkpoint: a truncated tensor file in the step-6 checkpoint of a copy of the
    reference run. Resuming from that path explicitly fails with exit code 2 and a message naming the
    file; ``checkpoint.resume=auto`` skips it with a warning naming the file and resumes from step 4.
  * torchrun --nproc-per-node 2 --max-restarts 1: rank 1 SIGKILLs itself after step 3
    (``train.fail_at_step=3``), torchrun restarts both workers, which resume from step 2 and finish
    with the same step-6 loss, bit for bit, as an uninterrupted torchrun run; the same with the fast tier
    on two simulated nodes and no storage save before the kill: the workers recover from host memory;
    and the same kill without a restart, relaunched by hand after a node loss: with node 1's memory
    wiped the job recovers from node 0's replica (peer), with both nodes' memory wiped from storage.
CPU only; each launch takes 10-40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpframe.checkpoint.faults import KILL_IN_SAVE_ENV

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
COMMON = ["train=smoke", "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=0", "parallel.micro_batch_size=2",
          "data.seq_len=32", "data.num_synthetic_tokens=50000", "train.progress=false", "train.tensorboard=false"]


def run(cmd: list[str], run_dir: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), **(env or {}))
    return subprocess.run([*cmd, f"hydra.run.dir={run_dir}"], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def launch(args: list[str], run_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """launch.py with 2 local processes (dp2, ZeRO-1), started by its local launcher."""
    return run([sys.executable, str(REPO / "launch.py"), *COMMON, "parallel.dp=2", "parallel.zero_stage=1", *args], run_dir, env)


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of metrics.jsonl; a step logged twice (before and after a restart) keeps the last."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    ok(launch(["checkpoint.resume=none"], run_dir))
    return run_dir


def test_stall_of_every_save_in_metrics(reference):
    stalls = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines() if "ckpt_stall_s" in x]
    assert [r["step"] for r in stalls] == [2, 4, 6]
    assert all(r["ckpt_stall_s"] > 0 for r in stalls)


def test_kill_during_save_leaves_the_previous_checkpoint(reference, tmp_path):
    killed = launch(["checkpoint.resume=none"], tmp_path, env={KILL_IN_SAVE_ENV: "4"})
    assert killed.returncode != 0
    assert f"{KILL_IN_SAVE_ENV}=4: rank 0 kills itself in the middle of a save" in killed.stdout + killed.stderr
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / ".staging-step_00000004" / "tensors" / "rank00000.safetensors").is_file()
    assert not (ckpts / "step_00000004").exists()
    assert (ckpts / "latest").read_text().strip() == "step_00000002"

    resumed = launch(["checkpoint.resume=auto"], tmp_path)
    ok(resumed)
    assert f"resumed from {ckpts / 'step_00000002'}: step 2" in resumed.stdout
    got, ref = losses(tmp_path), losses(reference)
    assert [got[s] for s in range(3, 7)] == [ref[s] for s in range(3, 7)]
    assert not (ckpts / ".staging-step_00000004").exists()  # the resumed run saved step 4 over it


def test_damaged_checkpoint_named_and_skipped(reference, tmp_path):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    victim = tmp_path / "checkpoints" / "step_00000006" / "tensors" / "rank00000.safetensors"
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)

    explicit = launch([f"checkpoint.resume={victim.parents[1]}"], tmp_path / "explicit")
    assert explicit.returncode == 2
    assert f"{victim}:" in explicit.stdout + explicit.stderr and "truncated" in explicit.stdout + explicit.stderr

    auto = launch(["checkpoint.resume=auto", "train.steps=6"], tmp_path)
    ok(auto)
    assert f"skipping a damaged checkpoint: {victim}:" in auto.stdout + auto.stderr
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000004'}: step 4" in auto.stdout
    got, ref = losses(tmp_path), losses(reference)
    assert [got[5], got[6]] == [ref[5], ref[6]]


@pytest.mark.dist
def test_torchrun_restart_after_sigkill_finishes_like_an_uninterrupted_run(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                "--monitor-interval", "0.5", str(REPO / "launch.py"), *COMMON, "parallel.dp=2"]
    ok(run(torchrun, tmp_path / "clean"))
    failing = run([*torchrun, "train.fail_at_step=3"], tmp_path / "restarted")
    ok(failing)
    out = failing.stdout + failing.stderr
    assert "train.fail_at_step=3: rank 1 kills itself after step 3" in out
    assert f"resumed from {tmp_path / 'restarted' / 'checkpoints' / 'step_00000002'}: step 2" in out
    clean, restarted = losses(tmp_path / "clean"), losses(tmp_path / "restarted")
    assert restarted[6] == clean[6]
    assert [restarted[s] for s in range(3, 7)] == [clean[s] for s in range(3, 7)]

    # the fast tier, two simulated nodes (one rank each), no storage save before the kill: the restarted
    # workers recover from host memory (the killed rank's node kept its snapshot) and finish alike
    memory = run([*torchrun, "train.fail_at_step=3", "cluster.nodes=2", "cluster.gpus_per_node=1", "checkpoint.interval=4",
                  "checkpoint.memory_interval=1", f"checkpoint.memory_dir={tmp_path / 'shm'}"], tmp_path / "memory")
    ok(memory)
    resumed = [json.loads(x) for x in (tmp_path / "memory" / "metrics.jsonl").read_text().splitlines() if "resumed_from" in x]
    # the killed rank's step-2 snapshot is complete unless its background write was slower than step 3
    assert len(resumed) == 1 and resumed[0]["resumed_from"] == "memory" and resumed[0]["resumed_step"] in (1, 2), resumed
    got = losses(tmp_path / "memory")
    assert [got[s] for s in range(2, 7)] == [clean[s] for s in range(2, 7)]
    assert not any((tmp_path / "shm").iterdir())  # freed when the run ended

    # the same kill with no restart by torchrun (the job fails), then a node lost before the relaunch:
    # node 1's memory wiped, the relaunched job recovers from node 0's replica of rank 1's part (peer);
    # both nodes' memory wiped, from the storage checkpoint of step 2
    ckpt, shm = tmp_path / "ckpt", tmp_path / "shm2"
    fast = [*torchrun[:torchrun.index("--max-restarts") + 1], "0", *torchrun[torchrun.index("--max-restarts") + 2:],
            "cluster.nodes=2", "cluster.gpus_per_node=1", "checkpoint.memory_interval=1", f"checkpoint.memory_dir={shm}",
            f"checkpoint.dir={ckpt}"]
    killed = run([*fast, "train.fail_at_step=3"], tmp_path / "killed")
    assert killed.returncode != 0
    for d in (ckpt, shm):
        shutil.copytree(d, d.with_name(d.name + ".killed"))
    for wiped, tier in ((["node001"], "peer"), (["node000", "node001"], "storage")):
        for d in (ckpt, shm):
            shutil.rmtree(d)
            shutil.copytree(d.with_name(d.name + ".killed"), d)
        for node in wiped:
            for lost in shm.glob(f"hpframe-*/{node}"):
                shutil.rmtree(lost)
        ok(run(fast, tmp_path / tier))
        resumed = [json.loads(x) for x in (tmp_path / tier / "metrics.jsonl").read_text().splitlines() if "resumed_from" in x]
        assert len(resumed) == 1 and resumed[0]["resumed_from"] == tier, (tier, resumed)
        # peer: the newest snapshot complete on node 0, its own part and rank 1's replica (the kill comes
        # after step 3, before its snapshot; step 2's unless its background write was still running);
        # storage: the synchronous save of step 2
        first = resumed[0]["resumed_step"]
        assert first in ((1, 2) if tier == "peer" else (2,)), (tier, resumed)
        got = losses(tmp_path / tier)
        assert [got[s] for s in range(first + 1, 7)] == [clean[s] for s in range(first + 1, 7)], tier
