"""Starting the processes of a run on this machine, and agreeing on one run directory.

``python launch.py`` runs as one process. When the plan needs several processes and none were
started by a launcher (RANK/WORLD_SIZE unset), ``launch_local`` starts them itself, with the
environment torchrun gives its workers: the composed config is written to ``RUN_DIR/run_config.yaml``
and every worker runs ``python -m hpframe.worker RUN_DIR/run_config.yaml``, so all ranks share one
config and one run directory. The launcher reaps the workers in the order they end (the failure
summary names the rank that failed first), passes SIGTERM/SIGINT on for a preemption stop, and its
workers die with it (``watch_parent``, PR_SET_PDEATHSIG). Under torchrun or the DeepSpeed launcher
(RANK/WORLD_SIZE set) each rank composed its own config; ``agree_on_run_dir`` makes them all use
rank 0's run directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Callable

from omegaconf import OmegaConf

from hpframe.config.convert import from_dict, to_dict
from hpframe.config.schema import RunConfig
from hpframe.logging import get_logger

log = get_logger(__name__)

CONFIG_FILE = "run_config.yaml"
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
LAUNCHER_PID_ENV = "HPFRAME_LAUNCHER_PID"
"""The pid of the ``launch_local`` process, in its workers' environment."""


def under_launcher() -> bool:
    """True when a launcher (torchrun, the DeepSpeed launcher, launch_local) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def write_run_config(cfg: RunConfig) -> Path:
    """Write the composed config (resolved, plain YAML) into the run directory; return its path."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    return path


def read_run_config(path: str | Path) -> RunConfig:
    """The RunConfig a worker runs, as written by ``write_run_config``."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(data, dict)
    return from_dict(data)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _set_parent_death_signal() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl (an unusual libc): the watchdog thread still covers it
        pass


def _child_setup(parent: int) -> Callable[[], None]:
    """What a worker runs between fork and exec: die with the launcher, and at once if it is gone already."""

    def setup() -> None:
        _set_parent_death_signal()
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return setup


DEEPSPEED_LAUNCH_ENV = ("CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")
"""Variables the DeepSpeed launcher's per-node process (``deepspeed.launcher.launch``) sets for its workers."""


def started_by_a_launcher_process() -> bool:
    """Whether this worker's parent is a launcher that supervises it: ``launch_local``, torchrun's agent
    or the DeepSpeed launcher's per-node process (which kills its workers on SIGTERM and when one fails).

    Ranks started by hand (RANK/WORLD_SIZE exported in a shell, perhaps under nohup) are not: their
    parent is a shell whose exit must not end them.
    """
    return (os.environ.get(LAUNCHER_PID_ENV) == str(os.getppid()) or "TORCHELASTIC_RUN_ID" in os.environ
            or all(k in os.environ for k in DEEPSPEED_LAUNCH_ENV))


def watch_parent(interval_s: float = 0.5) -> None:
    """End this worker (SIGKILL) once its launcher is gone: PR_SET_PDEATHSIG on Linux, and a daemon
    thread polling the parent pid, which also covers other systems and torchrun's workers (whose
    agent may have been killed with SIGKILL). No-op for ranks not started by a launcher process.
    """
    parent = os.getppid()
    if parent == 1 or not started_by_a_launcher_process():
        return  # no launcher to outlive
    _set_parent_death_signal()  # pdeathsig fires on the death of the thread that forked us; harmless if set twice

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        print(f"hpframe: rank {os.environ.get('RANK', '?')}: the launcher (pid {parent}) is gone; stopping this "
              "worker", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="hpframe-parent-watch", daemon=True).start()


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` for a Popen return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def shell_code(code: int) -> int:
    """A Popen return code as a shell reports it (128 + signal number for a killed process)."""
    return 128 - code if code < 0 else code


class LocalJob:
    """``nproc`` worker processes of one run on this machine (see ``launch_local``)."""

    def __init__(self, nproc: int, *, grace_s: float) -> None:
        self.nproc, self.grace_s = nproc, grace_s
        self.procs: dict[int, subprocess.Popen] = {}  # pid -> process
        self.ranks: dict[int, int] = {}  # pid -> rank
        self.exits: list[tuple[int, int]] = []  # (rank, return code) in the order the workers ended
        self.stopping = ""  # name of the stop signal forwarded to the workers
        self._kill_timer: threading.Timer | None = None

    def start(self, config_path: Path, *, argv: list[str] | None = None) -> None:
        """Start the workers: ``python -m hpframe.worker CONFIG`` (``argv`` replaces it: tests, hpframe.evaluate)."""
        argv = argv or [sys.executable, "-m", "hpframe.worker", str(config_path)]
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(self.nproc),
                   LOCAL_WORLD_SIZE=str(self.nproc), GROUP_RANK="0", NODE_RANK="0", **{LAUNCHER_PID_ENV: str(os.getpid())})
        # two CPU processes per core would fight over OpenMP threads; torchrun makes the same choice
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.nproc)))
        for rank in range(self.nproc):
            env.update(RANK=str(rank), LOCAL_RANK=str(rank))
            p = subprocess.Popen(argv, env=env, preexec_fn=_child_setup(os.getpid()))
            self.procs[p.pid], self.ranks[p.pid] = p, rank

    def forward(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM/SIGINT to the launcher: ask every worker to stop with a final checkpoint (SIGTERM)."""
        name = signal.Signals(signum).name
        if self.stopping:
            log.warning(f"{name} received; already stopping the workers")
            return
        self.stopping = name
        log.warning(f"{name} received: the workers stop after their current step with a final checkpoint "
                    f"(checkpoint.preempt_grace_s={self.grace_s:g} s)")
        self._signal_alive(signal.SIGTERM)
        self._kill_later(self.grace_s + 10.0)  # a worker stuck past its own grace timer

    def _signal_alive(self, sig: int) -> None:
        for pid, p in self.procs.items():
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def _kill_later(self, delay_s: float) -> None:
        if self._kill_timer is None:
            self._kill_timer = threading.Timer(delay_s, self._signal_alive, args=(signal.SIGKILL,))
            self._kill_timer.daemon = True
            self._kill_timer.start()

    def wait(self) -> None:
        """Reap the workers in the order they end; after a failure, the others get 5 s, then SIGKILL."""
        while len(self.exits) < self.nproc:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid not in self.procs:
                continue
            code = os.waitstatus_to_exitcode(status)
            self.procs[pid].returncode = code
            self.exits.append((self.ranks[pid], code))
            if code != 0 and not self.stopping:
                self._kill_later(5.0)  # the others fail at their next collective; a stalled one never does
        if self._kill_timer is not None:
            self._kill_timer.cancel()

    def result(self) -> int:
        """0; or the code of the worker that failed first (named in the log), preemption codes unchanged."""
        from hpframe.train.preempt import EXIT_PREEMPTED, EXIT_PREEMPTED_UNSAVED

        failed = [(rank, code) for rank, code in self.exits if code != 0]
        if not failed:
            return 0
        codes = {code for _, code in self.exits}
        if self.stopping and codes <= {0, EXIT_PREEMPTED, EXIT_PREEMPTED_UNSAVED}:  # a stop, not a failure
            return EXIT_PREEMPTED_UNSAVED if EXIT_PREEMPTED_UNSAVED in codes else EXIT_PREEMPTED
        rank, code = failed[0]
        later = ", ".join(f"rank {r} {describe_exit(c)}" for r, c in failed[1:])
        log.error(f"{len(failed)} of {self.nproc} processes failed; first: rank {rank} ({describe_exit(code)})"
                  + (f"; then {later}" if later else ""), all_ranks=False)
        return shell_code(code)


def launch_local(cfg: RunConfig, nproc: int, *, module: str = "hpframe.worker", extra_args: tuple[str, ...] = ()) -> int:
    """Start ``nproc`` workers on this machine and wait for them; return the run's exit code.

    Each worker runs ``python -m MODULE RUN_DIR/run_config.yaml EXTRA_ARGS...`` (``hpframe.worker`` by
    default; ``hpframe.evaluate`` starts its workers this way too) with the environment torchrun
    would give it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). Workers die with the launcher
    (PR_SET_PDEATHSIG on Linux, plus ``watch_parent``). SIGTERM or SIGINT to the launcher is passed on as
    SIGTERM: the workers agree on a step, write a final checkpoint and exit with EXIT_PREEMPTED.
    The exit code is 0 when every worker succeeded, else that of the worker that ended first with an
    error (so a worker's user error (2) or non-finite stop (3) reaches the shell unchanged; a killed
    worker gives 128 + signal), and the log names that rank.
    """
    path = write_run_config(cfg)
    job = LocalJob(nproc, grace_s=cfg.checkpoint.preempt_grace_s)
    log.info(f"starting {nproc} local processes, config {path}")
    previous = {sig: signal.signal(sig, job.forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        job.start(path, argv=[sys.executable, "-m", module, str(path), *extra_args])
        job.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return job.result()


def single_process_env() -> None:
    """Give a one-process run the environment a launcher would (DeepSpeed insists on LOCAL_RANK)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def agree_on_run_dir(output_dir: str) -> str:
    """Rank 0's run directory, on every rank (a collective over the world group).

    Ranks started by torchrun composed their config separately, so Hydra's time-stamped run directory
    can differ by a second between them. The directory a non-zero rank created for itself is removed
    when it holds nothing but Hydra's own ``.hydra`` files.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return output_dir
    chosen = [output_dir]
    dist.broadcast_object_list(chosen, src=0)
    mine = Path(output_dir)
    if chosen[0] != output_dir and mine.is_dir():
        entries = {p.name for p in mine.iterdir()}
        if entries <= {".hydra"}:
            shutil.rmtree(mine / ".hydra", ignore_errors=True)
            try:
                mine.rmdir()
            except OSError:  # another rank of this node may share it, or something else was written
                pass
    return str(chosen[0])


def exit_worker(code: int) -> None:
    """End a worker process right after its clean shutdown: flush, then ``os._exit(code)``.

    After a run has finished (metrics, TensorBoard and checkpoint files closed, process group
    destroyed), the interpreter's teardown occasionally aborts in C++ static destructors of the
    distributed runtime ("terminate called without an active exception", exit -6); seen once in three
    clean CI runs of the suite. That would turn a finished run into a failed worker, and under
    ``torchrun --max-restarts`` into a restart. Skipping the teardown removes the race.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
