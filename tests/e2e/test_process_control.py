"""Process control end to end: ``launch.py`` with 2 local processes (dp2, gloo, CPU, Mixtral debug recipe).

* SIGTERM to the launcher (what SLURM and Kubernetes send): both workers stop after the same step (else
  the final save, a collective, could not complete), that step's checkpoint is committed and named by
  ``latest``, the exit code is 4, RUN/plan.json and RUN/train.log are there.
* the relaunch into the same directory, with another global batch, resumes from that checkpoint (the
  change warned about and recorded in metrics.jsonl). While it runs, a second ``launch.py`` into the
  directory is refused (exit 2, naming the owner's pid). After ``kill -9`` of its launcher both workers
  are gone (PR_SET_PDEATHSIG / the parent watchdog) and the directory's lock is free.
* the same under the DeepSpeed launcher's per-node process (``python -m deepspeed.launcher.launch``,
  what ``deepspeed`` runs on each node): after ``kill -9`` of it, both of its workers are gone.
* a stalled rank (SIGSTOP of rank 1): rank 0's next collective times out after
  ``train.collective_timeout_s`` and the launcher's summary names rank 0 as the rank that failed first.
* one process: the checkpoint directory replaced by a file mid-run stops the run with exit code 6 (no later
  save could succeed); a dry run and a run refused for an unwritable checkpoint directory leave no run
  directory; two ``launch.py`` started at once resolve two different default run directories.
Linux only (reads /proc). Each launch takes 5-15 s on 2 cores; every wait has a timeout.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.dist,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]
# endless tiny training: the tests stop it themselves
COMMON = ["train=smoke", "train.steps=100000", "parallel.dp=2", "parallel.micro_batch_size=2", "data.seq_len=32",
          "data.num_synthetic_tokens=50000", "train.progress=false", "train.tensorboard=false", "train.eval_interval=0"]
WAIT_S = 180.0


def _env() -> dict[str, str]:
    return dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), OMP_NUM_THREADS="1")


def start(args: list[str], run_dir: Path) -> subprocess.Popen:
    """launch.py in the background; its console output goes to RUN_DIR/../console_<name>.txt."""
    out = open(run_dir.parent / f"console_{run_dir.name}.txt", "w")  # noqa: SIM115 - closed by the process's end
    return subprocess.Popen([sys.executable, str(REPO / "launch.py"), *COMMON, *args, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True)


def console(run_dir: Path) -> str:
    return (run_dir.parent / f"console_{run_dir.name}.txt").read_text()


def steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(x) for x in lines if x.strip()]


def wait_for(cond, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + WAIT_S
    while not cond():
        assert proc is None or proc.poll() is None, f"launch.py ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.2)


def workers(pid: int) -> dict[int, int]:
    """rank -> pid of the launcher's child processes."""
    kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    out = {}
    for kid in kids:
        env = dict(e.split("=", 1) for e in Path(f"/proc/{kid}/environ").read_text().split("\0") if "=" in e)
        out[int(env["RANK"])] = kid
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_sigterm_checkpoint_resume_and_kill_of_the_launcher(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(["checkpoint.interval=100000", "checkpoint.keep_last=0"], run_dir)
    try:
        wait_for(lambda: sum("loss" in r for r in steps(run_dir)) >= 2, "two steps", proc)
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=WAIT_S)
    finally:
        proc.kill()
    out = console(run_dir)
    assert code == 4, out[-4000:]
    last = max(r["step"] for r in steps(run_dir) if "loss" in r)
    tag = f"step_{last:08d}"
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == tag and (ckpts / tag / "MANIFEST.json").is_file()
    assert f"stopped by SIGTERM after step {last}, final checkpoint written; exit code 4" in out
    assert json.loads((run_dir / "plan.json").read_text())["world_size"] == 2
    assert "starting 2 local processes" in (run_dir / "train.log").read_text()

    # resumable, with another global batch (2 x 2 accumulation x 2 dp = 8 instead of 4): warned and recorded
    proc = start(["checkpoint.interval=100000", "parallel.grad_accum=2"], run_dir)
    try:
        wait_for(lambda: any(r.get("step") == last + 1 and "loss" in r for r in steps(run_dir)), "a resumed step", proc)
        assert f"resumed from {ckpts / tag}: step {last}" in (run_dir / "train.log").read_text()
        change = [r for r in steps(run_dir) if "checkpoint_global_batch_size" in r]
        assert change == [{"step": last, "global_batch_size": 8, "tokens_per_step": 256,
                           "checkpoint_global_batch_size": 4, "checkpoint_tokens_per_step": 128}]
        # one live job per run directory: a second launch.py is refused before it starts anything
        pids = workers(proc.pid)
        assert sorted(pids) == [0, 1]
        second = subprocess.run([sys.executable, str(REPO / "launch.py"), *COMMON, f"hydra.run.dir={run_dir}"], cwd=REPO,
                                env=_env(), capture_output=True, text=True, timeout=WAIT_S)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert f"run directory {run_dir} is in use by a running job (pid {proc.pid} on " in second.stderr
        assert "starting 2 local processes" not in second.stdout
    finally:
        proc.kill()  # kill -9 of the launcher
        proc.wait(timeout=WAIT_S)
    wait_for(lambda: not any(alive(p) for p in pids.values()), "the workers to end after the launcher's death")
    with open(run_dir / ".lock") as f:  # free: the dead launcher holds nothing
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_stalled_rank_is_detected_by_the_collective_timeout(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(["checkpoint=off", "train.collective_timeout_s=3"], run_dir)
    try:
        wait_for(lambda: any("loss" in r for r in steps(run_dir)), "the first step", proc)
        os.kill(workers(proc.pid)[1], signal.SIGSTOP)
        code = proc.wait(timeout=WAIT_S)
    finally:
        proc.kill()
    out = console(run_dir)
    assert code == 1, out[-4000:]
    assert "2 of 2 processes failed; first: rank 0 (exit code 1); then rank 1 killed by SIGKILL" in out
    assert "hpframe: a collective timed out after 3 s (train.collective_timeout_s): another rank stalled or died" in out


def test_checkpoint_directory_lost_mid_run_stops_with_a_clear_error(tmp_path):
    # one process; the checkpoint directory is replaced by a file after the first save: the next save fails,
    # no later save can succeed, so the run stops (exit 6) instead of training on without checkpoints
    run_dir, ckpts = tmp_path / "run", tmp_path / "ckpt"
    proc = start(["parallel.dp=1", "checkpoint.interval=1", f"checkpoint.dir={ckpts}"], run_dir)
    try:
        wait_for(lambda: (ckpts / "latest").is_file(), "the first checkpoint", proc)
        ckpts.rename(tmp_path / "ckpt_moved")
        ckpts.write_text("not a directory\n")
        code = proc.wait(timeout=WAIT_S)
    finally:
        proc.kill()
    out = console(run_dir)
    assert code == 6, out[-4000:]
    assert f"cannot write checkpoints to {ckpts}" in out and "and the next one cannot succeed either" in out
    failed = [r for r in steps(run_dir) if "checkpoint_error" in r]
    assert len(failed) == 1 and failed[0]["continued"] is False


def test_dry_run_and_unwritable_checkpoint_dir_leave_no_run_dir(tmp_path):
    def launch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, env=_env(), capture_output=True,
                              text=True, timeout=WAIT_S)

    dry = launch("plan.dry_run=true", f"hydra.run.dir={tmp_path / 'dry'}")
    assert dry.returncode == 0 and "mixtral_debug on cpu" in dry.stdout
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = launch("train=smoke", f"checkpoint.dir={blocker}/ckpt", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert f"checkpoint.dir: cannot write checkpoints to {blocker}/ckpt: Not a directory" in bad.stderr
    assert "INFO step 1/" not in bad.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # neither run left a directory


def test_two_launches_at_once_get_two_run_dirs():
    # the default run directory is outputs/DATE/TIME-PID: the second-resolution time alone would be shared
    cmd = [sys.executable, str(REPO / "launch.py"), "--cfg", "hydra", "--resolve"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=WAIT_S)[0] for p in procs]
    dirs = []
    for p, out in zip(procs, outs):
        assert p.returncode == 0
        lines = out.splitlines()
        run_dir = lines[lines.index("  run:") + 1].split("dir: ", 1)[1]
        assert run_dir.startswith("outputs/") and run_dir.endswith(f"-{p.pid}")
        dirs.append(run_dir)
    assert dirs[0] != dirs[1]


def test_kill_of_the_deepspeed_launcher_ends_its_workers(tmp_path):
    import base64

    from hpframe.testing.distributed import free_port

    run_dir = tmp_path / "run"
    world = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    out = open(tmp_path / "console.txt", "w")  # noqa: SIM115 - closed by the process's end
    proc = subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world}", "--node_rank=0",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(REPO / "launch.py"), *COMMON,
                             "checkpoint.enabled=false", f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: sum("loss" in r for r in steps(run_dir)) >= 2, "two steps", proc)
        pids = workers(proc.pid)
        assert sorted(pids) == [0, 1]
    finally:
        proc.kill()  # kill -9 of the DeepSpeed launcher
        proc.wait(timeout=WAIT_S)
    try:
        wait_for(lambda: not any(alive(p) for p in pids.values()), "the workers to end after the DeepSpeed launcher's death")
    finally:  # orphans of a failed check must not train on
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
