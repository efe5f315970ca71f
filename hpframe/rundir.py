"""The run directory: a unique name per launch, one live job per directory, room for checkpoints.

* Name: Hydra's default run directory is ``outputs/DATE/TIME-PID`` (conf/config.yaml). The time has a
  one-second resolution; the process id of the launching ``launch.py`` (``${hpframe_pid:}``, registered
  by ``register_resolvers``) makes two launches in the same second on one machine use two directories.
* Ownership: ``RunLock`` holds an exclusive ``fcntl.flock`` on ``RUN/.lock`` for the life of the job (the
  launching process: ``launch.py`` itself, or its local launcher, or rank 0 under torchrun). The kernel
  drops the lock when that process dies, however it dies, so a killed job never holds a directory.
  The file records the owner's pid, host and start time for the message a second job gets.
* Nothing is left by runs that never started: ``discard_if_unused`` removes the directory Hydra created
  for a dry run or a refused configuration when it holds nothing but Hydra's ``.hydra`` files.
* Disk: ``check_checkpoint_dir`` makes sure, before step 1, that the checkpoint directory can be written
  and that its file system has room for one more checkpoint of the planned size.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import IO

from omegaconf import OmegaConf

from hpframe.plan.errors import PlanError

LOCK_FILE = ".lock"
HYDRA_DIR = ".hydra"


class RunDirBusyError(PlanError):
    """Another live job owns the run directory."""


def register_resolvers() -> None:
    """``${hpframe_pid:}``: the pid of the process composing the config (part of the run directory name)."""
    if not OmegaConf.has_resolver("hpframe_pid"):
        OmegaConf.register_new_resolver("hpframe_pid", lambda: str(os.getpid()), use_cache=True)


class RunLock:
    """An exclusive lock on ``RUN/.lock``, held from ``acquire`` until ``release`` or the process's death."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> "RunLock":
        """Take the lock; raise RunDirBusyError naming the owner (pid, host, start) when a live job holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the job's life
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "another process"
            f.close()
            raise RunDirBusyError(
                f"run directory {self.path.parent} is in use by a running job ({owner}); wait for it to end, stop it, "
                "or choose another directory (hydra.run.dir=...)", key="hydra.run.dir",
                values={"hydra.run.dir": str(self.path.parent)}) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        """Drop the lock (the file stays, naming the last owner)."""
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None


def discard_if_unused(run_dir: str | Path) -> bool:
    """Remove ``run_dir`` when it holds nothing but Hydra's ``.hydra`` files and a free lock (a run that never started),
    and, in Hydra's default layout, its folders ``outputs/DATE`` and ``outputs`` when they become empty.
    Returns whether it was removed."""
    import fcntl

    path = Path(run_dir)
    if not path.is_dir() or {p.name for p in path.iterdir()} - {HYDRA_DIR, LOCK_FILE}:
        return False
    if (path / LOCK_FILE).exists():
        with open(path / LOCK_FILE) as f:
            try:  # a job that has just claimed the directory keeps it
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            (path / LOCK_FILE).unlink()
    shutil.rmtree(path / HYDRA_DIR, ignore_errors=True)
    try:
        path.rmdir()
    except OSError:  # something appeared meanwhile: keep it
        return False
    date = path.parent
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.name):  # Hydra's default layout: outputs/DATE/TIME-PID
        for folder in (date, date.parent):
            with contextlib.suppress(OSError):  # not empty: another run's
                folder.rmdir()
    return True


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def check_checkpoint_dir(path: str | Path, need_bytes: int) -> None:
    """Raise PlanError unless ``path`` (created if missing) takes a new file and has ``need_bytes`` free.

    Run before step 1 so that a run cannot train for hours and then lose its work at the first save.
    """
    root = Path(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PlanError(f"checkpoint.dir: cannot write checkpoints to {root}: {err.strerror or err}",
                        key="checkpoint.dir", values={"checkpoint.dir": str(root)}) from None
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        raise PlanError(
            f"checkpoint.dir: {root} has {_gib(free)} free but one checkpoint of this plan needs {_gib(need_bytes)} "
            f"({need_bytes:,} bytes); free space, point checkpoint.dir elsewhere or set checkpoint.enabled=false",
            key="checkpoint.dir", values={"checkpoint.dir": str(root), "free_bytes": free, "checkpoint_bytes": need_bytes})
