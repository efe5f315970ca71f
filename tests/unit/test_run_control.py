"""Run directories, the local launcher's bookkeeping and the stop signal, on real files, processes and signals.

* ``RunLock``: a second lock on a held run directory is refused naming the owner's pid; the lock of a
  process killed with SIGKILL is free again (the kernel drops it).
* ``discard_if_unused`` removes a directory holding only ``.hydra`` and keeps one with anything else.
* ``check_checkpoint_dir``: a path that cannot be created and a free-space need above the file system's
  free bytes are refused with PlanError naming ``checkpoint.dir``, the path and the numbers.
* ``LocalJob``: two real worker processes where rank 1 dies by SIGKILL and rank 0 exits with 1 a moment
  later (the order of a crash and its consequence): the failure summary names rank 1 and the exit code
  is 128 + 9; the old summary named rank 0.
* ``StopRequest``: SIGTERM sent to this process sets the request (a second signal does not reset it),
  the grace timer fires when nothing finishes, and ``uninstall`` restores the previous handlers.
* ``guards.after_failed_save``: training continues (a metrics record says so) when the directory can take
  a checkpoint again, and stops with CheckpointStorageError naming the step when it cannot.
No torch.distributed; each test well under a second.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hpframe.launcher import LocalJob
from hpframe.plan import PlanError
from hpframe.rundir import RunDirBusyError, RunLock, check_checkpoint_dir, discard_if_unused
from hpframe.train.guards import CheckpointStorageError, after_failed_save
from hpframe.train.metrics import MetricsWriter
from hpframe.train.preempt import StopRequest

REPO = Path(__file__).resolve().parents[2]
HOLD_LOCK = "import sys, time; from hpframe.rundir import RunLock; lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_run_lock_refuses_a_live_owner_and_frees_on_kill(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError, match=rf"run directory {tmp_path} is in use by a running job \(pid {holder.pid} on ") as err:
            RunLock(tmp_path).acquire()
        assert err.value.key == "hydra.run.dir"
    finally:
        holder.kill()
        holder.wait(timeout=30)
    lock = RunLock(tmp_path).acquire()  # SIGKILL released it: no stale lock
    assert f"pid {os.getpid()} on " in (tmp_path / ".lock").read_text()
    lock.release()


def test_discard_if_unused(tmp_path):
    unused = tmp_path / "outputs" / "2026-12-06" / "14-00-00-123"
    (unused / ".hydra").mkdir(parents=True)
    (unused / ".hydra" / "config.yaml").write_text("a: 1\n")
    assert discard_if_unused(unused)
    assert not (tmp_path / "outputs").exists()  # the date folder and outputs/ went with it
    used = tmp_path / "run"
    (used / ".hydra").mkdir(parents=True)
    (used / "train.log").write_text("x\n")
    assert not discard_if_unused(used) and (used / "train.log").is_file()


def test_checkpoint_dir_not_writable_or_too_small(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PlanError, match=rf"checkpoint.dir: cannot write checkpoints to {blocker}/ckpt") as err:
        check_checkpoint_dir(blocker / "ckpt", 0)
    assert err.value.key == "checkpoint.dir"
    free = shutil.disk_usage(tmp_path).free
    need = free + 2**30
    with pytest.raises(PlanError, match=r"GiB free but one checkpoint of this plan needs") as err:
        check_checkpoint_dir(tmp_path / "ckpt", need)
    assert err.value.values["checkpoint_bytes"] == need and err.value.values["free_bytes"] <= free + 2**20
    check_checkpoint_dir(tmp_path / "ckpt", 1)  # fits: no error, nothing left behind but the directory
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_local_job_names_the_rank_that_failed_first(tmp_path, capsys):
    # rank 1 dies at once (SIGKILL); rank 0 notices and exits with 1 a moment later
    worker = ("import os, signal, time\n"
              "if os.environ['RANK'] == '1': os.kill(os.getpid(), signal.SIGKILL)\n"
              "time.sleep(0.5); raise SystemExit(1)\n")
    job = LocalJob(2, grace_s=25.0)
    job.start(tmp_path / "unused.yaml", argv=[sys.executable, "-c", worker])
    job.wait()
    assert job.exits == [(1, -9), (0, 1)]
    assert job.result() == 128 + 9
    assert "ERROR 2 of 2 processes failed; first: rank 1 (killed by SIGKILL); then rank 0 exit code 1" in capsys.readouterr().out


def test_stop_request_on_sigterm_and_grace_timer():
    fired = threading.Event()
    stop = StopRequest(0.05, on_timeout=fired.set)
    previous = signal.getsignal(signal.SIGTERM)
    stop.install()
    try:
        assert not stop.requested and not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signame == "SIGTERM" and stop.agreed()
        os.kill(os.getpid(), signal.SIGINT)  # a second signal keeps the first request
        assert stop.signame == "SIGTERM"
        assert fired.wait(timeout=30), "the grace timer did not fire"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_failed_save_continues_only_when_a_retry_can_work(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    err = OSError(28, "No space left on device")
    after_failed_save(err, step=7, root=tmp_path / "ckpt", need_bytes=1, last_good="step_00000005", writer=writer)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointStorageError, match=r"the checkpoint of step 9 failed .*No space left on device.* "
                       r"cannot write checkpoints to .*newest committed checkpoint: step_00000005"):
        after_failed_save(err, step=9, root=blocker / "ckpt", need_bytes=1, last_good="step_00000005", writer=writer)
    writer.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["continued"]) for r in records] == [(7, True), (9, False)]
    assert all("No space left on device" in r["checkpoint_error"] for r in records)
