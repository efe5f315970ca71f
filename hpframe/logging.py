"""Rank-aware logging: messages go out on rank 0 only unless a call asks for every rank.

    log = get_logger(__name__)
    log.info("building the model")            # rank 0 only
    log.info("local shard ready", all_ranks=True)  # every rank, prefixed with [rank R]

The rank comes from torch.distributed when it is initialized, else from the RANK environment
variable set by torchrun/elastic launchers, else 0.

``log_to_file(RUN/train.log)`` also appends every line this process logs to the run's log file (each
process of a run appends to the same file, a line at a time); ``console=False`` sends a line to that
file only (the plan table, which the console shows once already).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_configured = False


def current_rank() -> int:
    """Global rank of this process (0 outside a distributed run)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # torch is optional for the planner-only paths
        pass
    return int(os.environ.get("RANK", "0"))


def _console_only_if_asked(record: logging.LogRecord) -> bool:
    return getattr(record, "console", True)


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at emit time, so a live progress bar that redirects
    stdout (rich) prints log lines above itself instead of being torn by them."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # logging.StreamHandler.__init__ assigns it
        pass


def _configure() -> None:
    global _configured
    if _configured:
        return
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_console_only_if_asked)
    root = logging.getLogger("hpframe")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
    _configured = True


class RankLogger:
    """A thin wrapper over ``logging.Logger`` that filters by rank."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def _log(self, level: int, msg: str, *args: Any, all_ranks: bool = False, console: bool = True) -> None:
        rank = current_rank()
        extra = {"console": console}
        if all_ranks:
            self.logger.log(level, f"[rank {rank}] {msg}", *args, extra=extra)
        elif rank == 0:
            self.logger.log(level, msg, *args, extra=extra)

    def info(self, msg: str, *args: Any, all_ranks: bool = False, console: bool = True) -> None:
        """``console=False``: to the run's log file only (see ``log_to_file``)."""
        self._log(logging.INFO, msg, *args, all_ranks=all_ranks, console=console)

    def warning(self, msg: str, *args: Any, all_ranks: bool = False) -> None:
        self._log(logging.WARNING, msg, *args, all_ranks=all_ranks)

    def error(self, msg: str, *args: Any, all_ranks: bool = True, console: bool = True) -> None:
        """Errors go out on every rank by default: the failing rank may not be 0."""
        self._log(logging.ERROR, msg, *args, all_ranks=all_ranks, console=console)


def get_logger(name: str) -> RankLogger:
    """The rank-aware logger for ``name`` (under the ``hpframe`` hierarchy)."""
    _configure()
    if not name.startswith("hpframe"):
        name = f"hpframe.{name}"
    return RankLogger(logging.getLogger(name))


_log_files: dict[str, logging.Handler] = {}


def log_to_file(path: str | os.PathLike[str]) -> None:
    """Append what this process logs (from now on) to ``path`` as well; once per path."""
    key = os.path.abspath(path)
    if key in _log_files:
        return
    _configure()
    handler = logging.FileHandler(key, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    logging.getLogger("hpframe").addHandler(handler)
    _log_files[key] = handler


def close_log_files() -> None:
    """Detach and close the handlers of ``log_to_file`` (tests that run several runs in one process)."""
    root = logging.getLogger("hpframe")
    for handler in _log_files.values():
        root.removeHandler(handler)
        handler.close()
    _log_files.clear()
