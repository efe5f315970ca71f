"""Fault injection for restart tests (``train.fail_at_step``): a testing aid, off by default.

With ``train.fail_at_step=k > 0``, one process SIGKILLs itself right after optimizer step k (before that
step's checkpoint is saved): rank 1 of a multi-process run, rank 0 of a single process. Only in the
first attempt of a job: under torchrun, ``TORCHELASTIC_RESTART_COUNT`` > 0 marks a restarted worker,
which then trains on from the newest good checkpoint without failing again. SIGKILL gives the process
no chance to clean up, like an out-of-memory kill or a lost node.
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist

from hpframe.checkpoint.restart import restart_count
from hpframe.logging import get_logger

log = get_logger(__name__)


def maybe_fail(fail_at_step: int, step: int) -> None:
    """SIGKILL this process after ``step`` when ``fail_at_step`` asks for it (see the module docstring)."""
    if fail_at_step <= 0 or step != fail_at_step or restart_count() > 0:
        return
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == (1 if world > 1 else 0):
        log.warning(f"train.fail_at_step={fail_at_step}: rank {rank} kills itself after step {step} (testing aid)", all_ranks=True)
        os.kill(os.getpid(), signal.SIGKILL)


KILL_IN_SAVE_ENV = "HPFRAME_TEST_KILL_IN_SAVE"
"""Testing aid: ``HPFRAME_TEST_KILL_IN_SAVE=k`` makes rank 0 SIGKILL itself in the middle of the save of
step k, after its files are in the staging directory and before the manifest and the commit."""


def maybe_kill_in_save(step: int) -> None:
    """SIGKILL rank 0 mid-save when ``HPFRAME_TEST_KILL_IN_SAVE`` names ``step`` (first attempt only)."""
    want = os.environ.get(KILL_IN_SAVE_ENV, "")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if want and int(want) == step and rank == 0 and restart_count() == 0:
        log.warning(f"{KILL_IN_SAVE_ENV}={want}: rank 0 kills itself in the middle of a save (testing aid)")
        os.kill(os.getpid(), signal.SIGKILL)
