"""Saving checkpoints: a snapshot to host memory, then written and committed, inline or in a thread.

``Checkpointer.save(step, client_state)`` on every rank (CheckFreq-style when ``async_save``):
  1. wait for the previous save of this rank to finish (at most one in flight)
  2. rank 0 removes a staging directory a dead save left behind; barrier
  3. snapshot: ``reshard.capture`` (this rank's own ZeRO partition, TP chunk, expert rows) into host
     copies, plus this rank's RNG states
  -- training may continue from here; the rest runs inline (sync) or in a background thread (async) --
  4. every rank writes its safetensors file and RNG JSON into the staging directory, then its layout
     JSON (the completion mark)
  5. rank 0 waits until every rank's layout JSON is there (sync: a barrier; async: polling the
     files, because collectives must stay on the training thread), writes client_state.json, the
     checksum manifest, commits atomically (``latest`` moved last) and prunes old checkpoints
The time the calling thread spends in ``save`` is the training stall; it is returned and logged.

Every wait is bounded by ``timeout_s`` (``checkpoint.save_timeout_s``, or the plan's figure derived
from the planned write time): the barriers are gloo's ``monitored_barrier`` (on a gloo side group
when training runs on NCCL), which names the ranks that did not arrive; rank 0's wait for the other
ranks' parts names the missing ranks; joining the background write gives up after the bound. A rank
that dies or stalls mid-save thus ends the save with a ``CheckpointError`` naming it, never a hang
for torch's 30-minute collective timeout.

The background thread only writes files: no collectives, no CUDA work (the snapshot is already on
the host). DeepSpeed's decoupled writers and DCP's process-based async save hang on this
toolchain (docs/checkpointing.md), hence a plain thread.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hpframe.checkpoint import faults, reshard, store
from hpframe.checkpoint.portable import CLIENT_STATE, RankPart, parts_written, rng_file, rng_state_json, write_json, write_part
from hpframe.logging import get_logger

log = get_logger(__name__)


DEFAULT_TIMEOUT_S = 600.0
"""Bound on each wait when the caller gives none (the training loop passes the plan's figure)."""

_GLOO_GROUPS: dict[int, Any] = {}


def _gloo_group() -> Any:
    """A gloo group over every rank (``monitored_barrier`` exists on gloo only); the default group when
    it already is gloo. Created once per default group (a collective: every rank calls it in order)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _GLOO_GROUPS:
        _GLOO_GROUPS[key] = dist.new_group(backend="gloo")
    return _GLOO_GROUPS[key]


def bounded_barrier(timeout_s: float, what: str) -> None:
    """A barrier over every rank that fails after ``timeout_s`` with a CheckpointError naming the ranks
    that did not arrive (gloo's monitored_barrier; rank 0 collects the names)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    try:
        dist.monitored_barrier(group=_gloo_group(), timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as err:
        raise store.CheckpointError(
            f"{what}: not every rank arrived within {timeout_s:.0f} s (checkpoint.save_timeout_s); "
            f"a rank died or stalls: {err}") from err


@dataclass
class SaveStats:
    """What one ``save`` call cost the training thread."""

    step: int
    path: Path
    stall_s: float
    """Seconds the caller was blocked: waiting for the previous save, the snapshot and (sync) the write."""
    snapshot_s: float
    waited_s: float
    """Part of stall_s spent waiting for the previous asynchronous save."""


class Checkpointer:
    """Saves portable checkpoints of ``engine`` under ``root``; one per process, used by every rank."""

    def __init__(self, engine: Any, root: str | Path, *, keep_last: int = 0, async_save: bool = False,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.engine, self.root = engine, Path(root)
        self.keep_last, self.async_save, self.timeout_s = keep_last, async_save, timeout_s
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if self.world_size > 1:
            _gloo_group()  # collective: created here, where every rank constructs its Checkpointer
        self._step: int | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: Path | None = None

    def save(self, step: int, client_state: dict[str, Any], *, part: RankPart | None = None,
             rng: dict | None = None) -> SaveStats:
        """Checkpoint after ``step`` optimizer steps (collective); returns the stall of the calling thread.

        ``part``/``rng``: this step's snapshot already taken for the fast tier (``memory.MemoryTier``),
        written as it is instead of capturing the same state again.
        """
        t0 = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - t0
        tag = store.tag_for_step(step)
        staging = store.staging_path(self.root, tag)
        if self.rank == 0 and staging.exists():  # left by a save that died
            shutil.rmtree(staging)
        bounded_barrier(self.timeout_s, f"checkpoint save of step {step}")
        self._step = step
        t1 = time.perf_counter()
        part = part if part is not None else reshard.capture(self.engine)
        rng = rng if rng is not None else rng_state_json()
        snapshot = time.perf_counter() - t1
        if self.async_save:
            self._thread = threading.Thread(
                target=self._run, args=(step, tag, staging, part, rng, client_state), name=f"hpframe-ckpt-{step}", daemon=True
            )
            self._thread.start()
        else:
            self._persist(step, tag, staging, part, rng, client_state, sync=True)
        stall = time.perf_counter() - t0
        return SaveStats(step=step, path=self.root / tag, stall_s=stall, snapshot_s=snapshot, waited_s=waited)

    def wait(self) -> None:
        """Block until this rank's in-flight save is written (and, on rank 0, committed); re-raise its error.

        Bounded: the background write is given 2 x ``timeout_s`` (its own files, then on rank 0 the
        wait for the other ranks' parts, itself bounded by ``timeout_s``), and the ranks then meet at a
        bounded barrier before they compare errors.
        """
        if self._thread is not None:
            self._thread.join(2 * self.timeout_s)
            if self._thread.is_alive():
                self._error = self._error or store.CheckpointError(
                    f"rank {self.rank}: the background write of step {self._step} did not finish within "
                    f"2 x {self.timeout_s:.0f} s (checkpoint.save_timeout_s); storage stalls?")
            self._thread = None
        err, self._error = self._error, None
        if self.async_save:
            self._agree(err, f"the asynchronous save of step {self._step}")
        elif err is not None:
            raise err

    def _agree(self, err: BaseException | None, what: str) -> None:
        """Raise on every rank together when ``what`` failed on any rank (collective, bounded).

        A write can fail on one rank only (its disk, its permissions): without agreement the others
        would go on into the next collectives and wait there for the full collective timeout. Every
        rank meets at a bounded barrier (a rank that died never arrives, and the barrier names it),
        then they exchange their errors: the failing rank raises its own, the others a
        CheckpointError naming the first failed rank and its error.
        """
        if dist.is_initialized() and self.world_size > 1:
            try:
                bounded_barrier(self.timeout_s, f"after {what}")
            except store.CheckpointError as lost:
                raise (err or lost) from (lost if err is not None else None)
            reports: list[str | None] = [None] * self.world_size
            dist.all_gather_object(reports, None if err is None else f"{type(err).__name__}: {err}", group=_gloo_group())
            failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
            if err is None and failed:
                r, msg = failed[0]
                raise store.CheckpointError(f"{what} failed on rank {r}: {msg}; not committed")
        if err is not None:
            raise err

    def close(self) -> None:
        """Finish the in-flight save (call before the process exits)."""
        self.wait()

    # ---- writing --------------------------------------------------------------------------------
    def _run(self, *args: Any) -> None:
        try:
            self._persist(*args, sync=False)
        except BaseException as err:  # surfaced by the next wait() on the training thread
            log.error(f"asynchronous checkpoint save failed: {err}", all_ranks=True)
            self._error = err
            try:  # tell rank 0, which polls for every rank's part before committing, not to wait
                marker = Path(args[2]) / "failed" / f"rank{self.rank}.txt"
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{type(err).__name__}: {err}\n")
            except OSError:
                pass

    def _persist(self, step: int, tag: str, staging: Path, part: RankPart, rng: dict, client_state: dict,
                 *, sync: bool) -> None:
        failure: BaseException | None = None
        try:
            staging.mkdir(parents=True, exist_ok=True)
            write_json(staging / rng_file(self.rank), rng)
            write_part(staging, part)
        except Exception as err:
            if not sync:
                raise  # _run marks it for rank 0; wait() agrees on it
            failure = err
        faults.maybe_kill_in_save(step)  # testing aid (HPFRAME_TEST_KILL_IN_SAVE), a no-op otherwise
        if sync:  # every rank's files are on disk before the manifest lists them, or every rank raises
            self._agree(failure, f"checkpoint save of step {step}: writing the parts")
        if self.rank == 0:
            self._wait_for_parts(staging)
            write_json(staging / CLIENT_STATE, client_state)
            store.write_manifest(staging, step, extra={
                "plan_fingerprint": client_state.get("plan_fingerprint"),
                "model_fingerprint": client_state.get("model_fingerprint"),
                "format": "hpframe-portable",
                "line": client_state.get("line"), "parent": client_state.get("parent"),  # store.py: lines
            })
            store.commit(self.root, tag)
            if self.keep_last > 0:
                store.prune(self.root, self.keep_last)
        self.last_committed = self.root / tag
        if sync:  # nobody returns before rank 0 committed
            bounded_barrier(self.timeout_s, f"checkpoint save of step {step}: the commit")

    def _wait_for_parts(self, staging: Path) -> None:
        want = set(range(self.world_size))
        deadline = time.monotonic() + self.timeout_s
        while (missing := want - parts_written(staging)):
            failed = sorted((staging / "failed").glob("rank*.txt")) if (staging / "failed").is_dir() else []
            if failed:
                raise store.CheckpointError(
                    f"{staging}: {failed[0].stem} could not write its part ({failed[0].read_text().strip()}); not committed"
                )
            if time.monotonic() > deadline:
                raise store.CheckpointError(
                    f"{staging}: ranks {sorted(missing)} did not finish writing their parts within {self.timeout_s:.0f} s "
                    f"(checkpoint.save_timeout_s); a rank died or stalls; not committed"
                )
            time.sleep(0.02)
