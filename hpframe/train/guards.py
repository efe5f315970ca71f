"""Checks the training loop makes around resumes and saves, so that nothing changes or fails silently.

* ``note_batch_change``: a resumed run whose tokens per step differ from the checkpoint's (another global
  batch or sequence length) is allowed (the learning-rate schedule counts steps, not tokens) but warned
  about and recorded in metrics.jsonl.
* ``after_failed_save``: a save that failed mid-run (disk full, permissions, a lost mount) is reported
  loudly (error log line and a metrics.jsonl record) and training goes on only when a later save can
  succeed: the checkpoint directory takes a new file and has room for a checkpoint of the planned size
  again (a transient error). Otherwise the run stops with ``CheckpointStorageError``: training on
  would produce work that cannot be saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from hpframe.checkpoint.store import CheckpointError
from hpframe.logging import get_logger
from hpframe.plan.errors import PlanError
from hpframe.rundir import check_checkpoint_dir

log = get_logger(__name__)

SAVE_ERRORS: tuple[type[BaseException], ...] = (OSError, CheckpointError, SafetensorError)
"""What a save raises when the storage fails (safetensors reports its own write errors as SafetensorError)."""

EXIT_CHECKPOINT_FAILED = 6
"""Exit code of a run stopped because a checkpoint could not be written and a later save could not succeed."""


class CheckpointStorageError(RuntimeError):
    """A save failed and the checkpoint directory cannot take another one; the run stops."""


def note_batch_change(path: Path, *, step: int, consumed: int, global_batch: int, seq_len: int,
                      writer: Any) -> None:
    """Warn and record when this run's tokens per step differ from those of the checkpoint at ``path``."""
    from hpframe.checkpoint.portable import CLIENT_STATE

    if step <= 0:
        return
    state = json.loads((Path(path) / CLIENT_STATE).read_text())  # verified against the manifest by the load
    old_batch = state.get("global_batch_size")
    old_tokens = int(old_batch) * int(state.get("seq_len", seq_len)) if old_batch else consumed // step
    new_tokens = global_batch * seq_len
    if old_tokens == new_tokens:
        return
    was = f"global batch {old_batch}" if old_batch else f"{old_tokens:,} tokens per step on average"
    log.warning(f"resuming {path} with another batch: the checkpoint trained with {was}, this run uses global batch "
                f"{global_batch} x {seq_len} tokens ({new_tokens:,} tokens per step); the schedule counts steps")
    writer.write({"step": step, "global_batch_size": global_batch, "tokens_per_step": new_tokens,
                  "checkpoint_global_batch_size": old_batch, "checkpoint_tokens_per_step": old_tokens},
                 prefix="resume_batch_change")


def after_failed_save(err: BaseException, *, step: int, root: Path, need_bytes: int, last_good: str | None,
                      writer: Any) -> None:
    """Report a failed save of ``step``; return if a later save can succeed, else raise CheckpointStorageError."""
    try:
        check_checkpoint_dir(root, need_bytes)
        retry: PlanError | None = None
    except PlanError as e:
        retry = e
    newest = last_good or "none written by this run"
    writer.write({"step": step, "checkpoint_error": f"{type(err).__name__}: {err}", "continued": retry is None},
                 prefix="checkpoint")
    if retry is not None:
        raise CheckpointStorageError(
            f"the checkpoint of step {step} failed ({type(err).__name__}: {err}) and the next one cannot succeed "
            f"either ({retry}); newest committed checkpoint: {newest}") from err
    log.error(f"hpframe: CHECKPOINT OF STEP {step} FAILED ({type(err).__name__}: {err}); {root} is writable and "
              f"has room for one again, so training continues and the next save retries; newest committed "
              f"checkpoint: {newest}")
