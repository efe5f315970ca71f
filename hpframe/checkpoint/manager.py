"""Save and resume training state through the engine's checkpoint calls.

Layout under the checkpoint root (``checkpoint.dir``, relative to the run directory), on top of the
crash-safe directories of ``hpframe.checkpoint.store`` (staging, manifest, atomic commit)::

    step_00000050/                 one checkpoint = one directory, handed to engine.save_checkpoint
        ...                        whatever the engine writes (DeepSpeed model/optimizer shards)
        rng_rank00000.pt           RNG states of each rank (torch CPU/CUDA, numpy, python)
        MANIFEST.json              written by rank 0 after every rank finished: files, step, plan
                                   fingerprint; a directory without it is never resumed from

API: ``save(engine, step, client_state, root=...)``, ``find_latest(root)``, ``load(engine, path)``.
``client_state`` is the loop's: step, consumed tokens, data-loader state, RNG states, the composed
config and the plan fingerprint; ``load`` returns it and refuses a checkpoint of another plan.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from hpframe.checkpoint import store
from hpframe.logging import get_logger

log = get_logger(__name__)


class CheckpointEngine(Protocol):
    def save_checkpoint(self, path: str, client_state: dict[str, Any]) -> None: ...

    def load_checkpoint(self, path: str) -> dict[str, Any]: ...


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    """This process's RNG states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plan_fingerprint(plan: Any, cfg: Any) -> str:
    """A short hash of what a checkpoint's shards depend on: the layout and the parameter shapes.

    Covers world size, degrees, ZeRO stage, the pipeline partition, every model.* field and the MoE
    fields that shape parameters. Training hyperparameters (lr, steps, loss coefficients) are left out,
    so they may change across a resume.
    """
    moe = cfg.moe
    key = {
        "layout": [plan.world_size, plan.tp, plan.pp, plan.dp, plan.ep, plan.zero_stage, list(plan.pipeline.layers_per_stage)],
        "model": {k: getattr(v, "value", v) for k, v in vars(cfg.model).items()},
        "moe": [moe.num_experts, moe.num_shared_experts, moe.expert_ffn_hidden_size, moe.moe_layer_freq],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_path(root: str | Path, step: int) -> Path:
    """Directory of the committed checkpoint taken after ``step`` optimizer steps."""
    return Path(root) / store.tag_for_step(step)


def find_latest(root: str | Path) -> Path | None:
    """The newest committed checkpoint under ``root`` that verifies against its manifest, or None."""
    found = store.find_latest_good(Path(root))
    if found is None:
        return None
    for reason in found.skipped:
        log.warning(f"skipping a damaged checkpoint: {reason}")
    return found.path


def save(engine: CheckpointEngine, step: int, client_state: dict[str, Any], *, root: str | Path, keep_last: int = 0) -> Path:
    """Save on every rank (collective) into a staging directory; rank 0 commits it and prunes.

    Every rank writes its engine shards and RNG states; after a barrier rank 0 writes the manifest
    (with the plan fingerprint), moves the directory into place atomically, and keeps the
    ``keep_last`` newest checkpoints (0 = keep all).
    """
    root = Path(root)
    tag = store.tag_for_step(step)
    staging = store.staging_path(root, tag)
    if _rank() == 0 and staging.exists():  # left by a save that died
        shutil.rmtree(staging)
    _barrier()
    staging.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(staging), client_state)
    torch.save(rng_state(), staging / f"rng_rank{_rank():05d}.pt")
    _barrier()  # every rank's files are on disk before the manifest lists them
    if _rank() == 0:
        store.write_manifest(staging, step, extra={"plan_fingerprint": client_state.get("plan_fingerprint")})
        store.commit(root, tag)
        if keep_last > 0:
            store.prune(root, keep_last)
    _barrier()
    return root / tag


def load(engine: CheckpointEngine, path: str | Path, *, plan_fingerprint: str | None = None) -> dict[str, Any]:
    """Load a checkpoint on every rank; return its client_state and restore this rank's RNG states.

    Raises ValueError when the checkpoint is incomplete or was written under a different plan
    (re-sharding to another layout is an explicit conversion, not a resume).
    """
    path = Path(path)
    try:
        manifest = store.verify(path, checksums=False)  # find_latest already checksummed the newest candidate
    except store.CheckpointError as err:
        raise ValueError(f"checkpoint.resume={str(path)!r}: {err}") from err
    saved = manifest.get("plan_fingerprint")
    if plan_fingerprint is not None and saved is not None and saved != plan_fingerprint:
        raise ValueError(
            f"checkpoint {path} was written under plan {saved}, this run's plan is {plan_fingerprint}: "
            "parallel layout or model changed; resume with the same parallel.* and model.* settings"
        )
    client_state = engine.load_checkpoint(str(path))
    own = path / f"rng_rank{_rank():05d}.pt"
    if own.is_file():
        set_rng_state(torch.load(own, weights_only=False))  # our own file, written by save() above
    elif client_state.get("rng"):
        set_rng_state(client_state["rng"])
    return client_state
