"""Save and resume training state: portable checkpoints on the crash-safe store.

Layout under the checkpoint root (``checkpoint.dir``, relative to the run directory): the crash-safe
directories of ``hpframe.checkpoint.store`` (staging, manifest, atomic commit, ``latest``), each
holding a portable checkpoint (``hpframe.checkpoint.portable``: every logical tensor once, fp32 master
weights and Adam moments in safetensors, each rank writing its own shard; client_state.json;
one RNG JSON per rank). See docs/checkpointing.md.

API: ``save(engine, step, client_state, root=...)`` (or a ``Checkpointer`` for asynchronous saves),
``find_latest(root)``, ``load(engine, path)``. ``client_state`` is the loop's: step, consumed tokens,
data-loader state, the composed config and the plan fingerprint (JSON values); ``load`` returns it.
A checkpoint saved under another parallel layout (tp, pp, dp, ep, ZeRO stage) loads and is re-sharded
on the fly; a checkpoint of another model is refused with the tensors that differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hpframe.checkpoint import reshard, store
from hpframe.checkpoint.async_save import Checkpointer
from hpframe.checkpoint.portable import CLIENT_STATE, PortableCheckpoint, rng_file, set_rng_state_json
from hpframe.errors import UserError
from hpframe.logging import get_logger

log = get_logger(__name__)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def plan_fingerprint(plan: Any, cfg: Any) -> str:
    """A short hash of the layout and the parameter shapes: equal fingerprints = identical shards.

    Covers world size, degrees, ZeRO stage, the pipeline partition, every model.* field and the MoE
    fields that shape parameters. Training hyperparameters (lr, steps, loss coefficients) are left out.
    """
    moe = cfg.moe
    key = {
        "layout": [plan.world_size, plan.tp, plan.pp, plan.dp, plan.ep, plan.zero_stage, list(plan.pipeline.layers_per_stage)],
        "model": {k: getattr(v, "value", v) for k, v in vars(cfg.model).items()},
        "moe": [moe.num_experts, moe.num_shared_experts, moe.expert_ffn_hidden_size, moe.moe_layer_freq],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def layout_of(plan: Any) -> dict[str, int]:
    """The parallel layout recorded in client_state (what re-sharding converts from)."""
    return {"world_size": plan.world_size, "tp": plan.tp, "pp": plan.pp, "dp": plan.dp, "ep": plan.ep, "zero_stage": plan.zero_stage}


def checkpoint_path(root: str | Path, step: int) -> Path:
    """Directory of the committed checkpoint taken after ``step`` optimizer steps."""
    return Path(root) / store.tag_for_step(step)


def _on_rank0(fn: Any) -> Any:
    """``fn()`` computed by rank 0 only and broadcast (checksumming every file once, not once per rank).

    Returns ``(value, None)`` or ``(None, error message)`` identically on every rank, so all ranks
    raise together instead of one hanging in the next collective.
    """
    result: list[Any] = [None]
    if _rank() == 0:
        try:
            result[0] = (fn(), None)
        except (store.CheckpointError, OSError, ValueError) as err:
            result[0] = (None, str(err))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def find_latest(root: str | Path) -> Path | None:
    """The newest committed checkpoint under ``root`` that verifies against its manifest, or None.

    Damaged newer checkpoints (truncated or corrupted files) are skipped with a warning naming the
    file. Rank 0 checks the checksums; every rank gets its answer (a collective when distributed).
    """
    def newest() -> tuple[str, tuple[str, ...]] | None:
        found = store.find_latest_good(Path(root))
        return None if found is None else (str(found.path), found.skipped)

    found, error = _on_rank0(newest)
    if error is not None:
        raise UserError(f"checkpoint.dir={str(root)!r}: {error}")
    if found is None:
        return None
    for reason in found[1]:
        log.warning(f"skipping a damaged checkpoint: {reason}")
    return Path(found[0])


def save(engine: Any, step: int, client_state: dict[str, Any], *, root: str | Path, keep_last: int = 0) -> Path:
    """Save synchronously on every rank (collective); returns the committed directory."""
    return Checkpointer(engine, root, keep_last=keep_last).save(step, json_client_state(client_state)).path


def json_client_state(client_state: dict[str, Any]) -> dict[str, Any]:
    """``client_state`` without in-memory RNG objects (each rank's RNG is saved in its own JSON file)."""
    return {k: v for k, v in client_state.items() if k != "rng"}


def read_client_state(path: str | Path) -> dict[str, Any]:
    """client_state.json of a committed checkpoint."""
    return json.loads((Path(path) / CLIENT_STATE).read_text())


def load(engine: Any, path: str | Path, *, plan_fingerprint: str | None = None, checksums: bool = True) -> dict[str, Any]:
    """Load a checkpoint on every rank (collective; any saved layout); return its client_state, restore RNG states.

    Raises ValueError naming the file when the checkpoint is incomplete, truncated or corrupted, and
    naming the tensors when it belongs to a different model.
    """
    path = Path(path)
    if checksums:  # rank 0 reads every file once; the other ranks check sizes below
        _, error = _on_rank0(lambda: store.verify(path, checksums=True) and None)
        if error is not None:
            raise UserError(f"checkpoint.resume={str(path)!r}: {error}")
    try:
        manifest = store.verify(path, checksums=False)
    except store.CheckpointError as err:
        raise UserError(f"checkpoint.resume={str(path)!r}: {err}") from err
    if not (path / CLIENT_STATE).is_file():
        raise UserError(f"checkpoint.resume={str(path)!r}: no {CLIENT_STATE}: not a portable hpframe checkpoint")
    client_state = read_client_state(path)
    saved_fp = manifest.get("plan_fingerprint")
    same_layout = plan_fingerprint is None or saved_fp == plan_fingerprint
    if not same_layout:
        log.warning(f"re-sharding {path}: saved under {client_state.get('layout')}, loading under "
                    f"{layout_of(engine.plan)}")
    reshard.restore(engine, PortableCheckpoint(path))
    own = path / rng_file(_rank())
    if same_layout and own.is_file():
        set_rng_state_json(json.loads(own.read_text()))
    elif (path / rng_file(0)).is_file():  # another layout: ranks do not correspond; take rank 0's
        set_rng_state_json(json.loads((path / rng_file(0)).read_text()))
    step = int(client_state.get("step", manifest.get("step", 0)))
    ds = getattr(engine, "ds", None)
    if ds is not None:  # DeepSpeed's own counters (logging, pipeline schedule bookkeeping)
        ds.global_steps = step
        ds.global_samples = step * engine.plan.global_batch_size
    return client_state
