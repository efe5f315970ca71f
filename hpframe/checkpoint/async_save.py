"""Saving checkpoints: a snapshot to host memory, then written and committed, inline or in a thread.

``Checkpointer.save(step, client_state)`` on every rank (CheckFreq-style when ``async_save``):
  1. wait for the previous save of this rank to finish (at most one in flight)
  2. rank 0 removes a staging directory a dead save left behind; barrier
  3. snapshot: ``reshard.capture`` (collective: ZeRO partitions and TP shards gathered) into host
     copies, plus this rank's RNG states
  -- training may continue from here; the rest runs inline (sync) or in a background thread (async) --
  4. every rank writes its safetensors file and RNG JSON into the staging directory, then its layout
     JSON (the completion mark)
  5. rank 0 waits until every rank's layout JSON is there (sync: a barrier; async: polling the
     files, because collectives must stay on the training thread), writes client_state.json, the
     checksum manifest, commits atomically (``latest`` moved last) and prunes old checkpoints
The time the calling thread spends in ``save`` is the training stall; it is returned and logged.

The background thread only writes files: no collectives, no CUDA work (the snapshot is already on
the host). DeepSpeed's decoupled writers and DCP's process-based async save hang on this
toolchain (docs/checkpointing.md), hence a plain thread.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hpframe.checkpoint import faults, reshard, store
from hpframe.checkpoint.portable import CLIENT_STATE, RankPart, parts_written, rng_file, rng_state_json, write_json, write_part
from hpframe.logging import get_logger

log = get_logger(__name__)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
                 commit_timeout_s: float = 1800.0) -> None:
        self.engine, self.root = engine, Path(root)
        self.keep_last, self.async_save, self.commit_timeout_s = keep_last, async_save, commit_timeout_s
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: Path | None = None

    def save(self, step: int, client_state: dict[str, Any]) -> SaveStats:
        """Checkpoint after ``step`` optimizer steps (collective); returns the stall of the calling thread."""
        t0 = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - t0
        tag = store.tag_for_step(step)
        staging = store.staging_path(self.root, tag)
        if self.rank == 0 and staging.exists():  # left by a save that died
            shutil.rmtree(staging)
        _barrier()
        t1 = time.perf_counter()
        part = reshard.capture(self.engine)
        rng = rng_state_json()
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
        """Block until this rank's in-flight save is written (and, on rank 0, committed); re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        err, self._error = self._error, None
        if self.async_save and dist.is_initialized() and self.world_size > 1:
            # a background write can fail on one rank only: agree, so that every rank raises here
            # together instead of the others waiting in the next save's collectives forever
            reports: list[str | None] = [None] * self.world_size
            dist.all_gather_object(reports, None if err is None else f"{type(err).__name__}: {err}")
            failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
            if err is None and failed:
                r, msg = failed[0]
                raise store.CheckpointError(f"asynchronous checkpoint save failed on rank {r}: {msg}")
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
        staging.mkdir(parents=True, exist_ok=True)
        write_json(staging / rng_file(self.rank), rng)
        write_part(staging, part)
        faults.maybe_kill_in_save(step)  # testing aid (HPFRAME_TEST_KILL_IN_SAVE), a no-op otherwise
        if sync:
            _barrier()  # every rank's files are on disk before the manifest lists them
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
        if sync:
            _barrier()  # nobody returns before rank 0 committed

    def _wait_for_parts(self, staging: Path) -> None:
        want = set(range(self.world_size))
        deadline = time.monotonic() + self.commit_timeout_s
        while (missing := want - parts_written(staging)):
            failed = sorted((staging / "failed").glob("rank*.txt")) if (staging / "failed").is_dir() else []
            if failed:
                raise store.CheckpointError(
                    f"{staging}: {failed[0].stem} could not write its part ({failed[0].read_text().strip()}); not committed"
                )
            if time.monotonic() > deadline:
                raise store.CheckpointError(
                    f"{staging}: ranks {sorted(missing)} did not finish writing within {self.commit_timeout_s:.0f} s; not committed"
                )
            time.sleep(0.02)
