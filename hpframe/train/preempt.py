"""Stopping on SIGTERM / SIGINT (preemption, Ctrl-C) with a final checkpoint, within a grace period.

SLURM and Kubernetes send SIGTERM some seconds before they kill a job; Ctrl-C sends SIGINT to every
process of the terminal's foreground group. ``StopRequest`` turns either signal into a request that
the training loop reads between steps:

* ``install`` replaces the handlers of both signals (``uninstall`` restores them). The first signal
  records the request and starts a timer of ``checkpoint.preempt_grace_s``; further signals only log.
* ``agreed(device)`` is called after every step: with several ranks, the flags are all-reduced (max), so
  every rank stops after the same step even though the signal reaches each process at a different time.
* the loop then saves (or finishes the in-flight asynchronous save) and raises ``Preempted``; the
  process exits with ``EXIT_PREEMPTED``. If the grace period runs out first, the timer ends the process
  with ``EXIT_PREEMPTED_UNSAVED``; the newest committed checkpoint is intact (saves commit atomically).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable

from hpframe.logging import get_logger

log = get_logger(__name__)

EXIT_PREEMPTED = 4
"""Exit code of a run stopped by SIGTERM/SIGINT after writing its final checkpoint (resumable)."""
EXIT_PREEMPTED_UNSAVED = 5
"""Exit code of a run stopped by SIGTERM/SIGINT without a final checkpoint (the grace period ran out, the
save failed, or checkpoints are off); the newest committed checkpoint, if any, is intact."""
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped after ``step`` on a stop signal; ``saved``: its final checkpoint is committed."""

    def __init__(self, step: int, signame: str, *, saved: bool) -> None:
        what = "final checkpoint written" if saved else "no final checkpoint"
        super().__init__(f"stopped by {signame} after step {step}, {what}")
        self.step = step
        self.signame = signame
        self.saved = saved


class StopRequest:
    """The stop signal of this process and the agreement on it across ranks (see the module docstring)."""

    def __init__(self, grace_s: float, *, on_timeout: Callable[[], None] | None = None) -> None:
        self.grace_s = grace_s
        self.signame = ""
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None
        self._on_timeout = on_timeout or _exit_after_grace

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return bool(self.signame)

    def install(self) -> None:
        """Handle SIGTERM and SIGINT (main thread only; elsewhere signals cannot be handled)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the previous handlers and cancel the grace timer."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            log.warning(f"{name} received; already stopping after {self.signame} (final checkpoint within "
                        f"checkpoint.preempt_grace_s={self.grace_s:g} s)", all_ranks=True)
            return
        self.signame = name
        log.warning(f"{name} received: stopping after the current step with a final checkpoint "
                    f"(checkpoint.preempt_grace_s={self.grace_s:g} s)", all_ranks=True)
        self._timer = threading.Timer(self.grace_s, self._on_timeout)
        self._timer.daemon = True
        self._timer.start()

    def agreed(self, device: Any = None) -> bool:
        """Whether any rank received a stop signal (collective over the world group when there are several)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item() > 0)
        if stop and not self.requested:
            self.signame = "a stop signal on another rank"
        return stop


def _exit_after_grace() -> None:
    """The grace period is over and the final checkpoint is not committed: end the process now."""
    log.error(f"hpframe: the final checkpoint did not finish within checkpoint.preempt_grace_s; exiting with "
              f"code {EXIT_PREEMPTED_UNSAVED} (the newest committed checkpoint is intact)")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_PREEMPTED_UNSAVED)
