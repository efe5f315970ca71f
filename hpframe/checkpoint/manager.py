"""Save and resume training state: portable checkpoints on the crash-safe store.

Layout under the checkpoint root (``checkpoint.dir``, relative to the run directory): the crash-safe
directories of ``hpframe.checkpoint.store`` (staging, manifest, atomic commit, ``latest``), each
holding a portable checkpoint (``hpframe.checkpoint.portable``: every logical tensor once, fp32 master
weights and Adam moments in safetensors, each rank writing its own shard; client_state.json;
one RNG JSON per rank). See docs/checkpointing.md.

API for the loop: ``resume_point(choice, root)`` (which checkpoint ``checkpoint.resume`` selects, and
the line this run's saves belong to), ``load(engine, path)``; saving is ``async_save.Checkpointer``.
``client_state`` is the loop's: step, consumed tokens, data-loader state, the composed config, the plan
fingerprint and the line (JSON values); ``load`` returns it.
A checkpoint saved under another parallel layout (tp, pp, dp, ep, ZeRO stage) loads and is re-sharded
on the fly; a checkpoint of another model is refused with the tensors that differ.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hpframe.checkpoint import reshard, store
from hpframe.checkpoint.portable import CLIENT_STATE, PortableCheckpoint, rng_file, set_rng_state_json
from hpframe.errors import UserError
from hpframe.models.transformer import padded_vocab_size
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


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: the checkpoint to load (None: step 0) and the line its saves belong to."""

    path: Path | None
    lineage: dict[str, Any]
    """``{"line", "parent"}`` written into every manifest this run saves (``store.line_after_resume``)."""
    verified: bool
    """The checkpoint's checksums were checked while choosing it (``load`` need not read it twice)."""


def _decide(choice: str, root: Path) -> tuple[str | None, dict[str, Any], list[str], bool]:
    """Rank 0's part of ``resume_point``: (path, lineage, warnings to log, checksums verified)."""
    if choice == "none":
        found = store.checkpoint_dirs(root)
        notes = [f"checkpoint.resume=none: starting from step 0 although {root} holds {len(found)} checkpoint(s); "
                 "saves of the same steps will replace them"] if found else []
        return None, store.line_after_resume(root, None, None), notes, False
    if choice == "auto":
        sel = store.select_for_resume(root)  # CheckpointError (every checkpoint and why) when none is usable
        if sel is None:
            return None, store.line_after_resume(root, None, None), [], False
        about_latest = f"{root / store.LATEST}:"
        notes = [r if r.startswith(about_latest) else f"skipping a damaged checkpoint: {r}" for r in sel.skipped]
        if not sel.from_latest:
            notes.append(f"checkpoint.resume=auto: resuming from {sel.path} (step {sel.step}) instead of what "
                         f"{store.LATEST} names, because {sel.skipped[0] if sel.skipped else '?'}; this run starts a new line")
        return str(sel.path), store.line_after_resume(root, sel.path, sel.manifest), notes, True
    path = Path(choice)
    manifest = store.read_manifest(path)
    return str(path), store.line_after_resume(root, path, manifest), [], False


def resume_point(choice: str, root: str | Path) -> ResumePoint:
    """The checkpoint ``checkpoint.resume`` (``choice``: auto, none or a path) selects under ``root``.

    ``auto``: the checkpoint ``latest`` names; when it fails verification, the newest verified
    checkpoint of its lineage, with the reasons logged; checkpoints exist but none verifies: a
    UserError listing each one and why (a silent restart from step 0 would lose the run). Collective:
    rank 0 decides (checksums read once) and every rank gets the same answer.
    """
    decided, error = _on_rank0(lambda: _decide(choice, Path(root)))
    if error is not None:
        raise UserError(f"checkpoint.resume={choice!r}: {error}", key="checkpoint.resume")
    path, lineage, notes, verified = decided
    for note in notes:
        log.warning(note)
    return ResumePoint(path=None if path is None else Path(path), lineage=lineage, verified=verified)


def json_client_state(client_state: dict[str, Any]) -> dict[str, Any]:
    """``client_state`` without in-memory RNG objects (each rank's RNG is saved in its own JSON file)."""
    return {k: v for k, v in client_state.items() if k != "rng"}


def check_vocab_rows(path: Path, ckpt: PortableCheckpoint, client_state: dict[str, Any], model_cfg: Any) -> None:
    """Refuse, naming the key, a checkpoint whose embedding holds another number of (padded) vocabulary rows
    than this run's model: the usual cause is model.vocab_pad_multiple=0 (pad to parallel.tp) resolved at
    another tp when the checkpoint was written. Decided from the config and the files alone, so every rank
    raises together (no rank is left waiting in the collective restore)."""
    saved = ckpt.shapes.get(("param", "embed.weight"))
    rows = padded_vocab_size(model_cfg)
    if saved is None or saved[0] == rows:
        return
    was = client_state.get("config", {}).get("model", {})
    raise UserError(
        f"model.vocab_pad_multiple: checkpoint {path} holds {saved[0]} vocabulary rows (model.vocab_size="
        f"{was.get('vocab_size')} padded to a multiple of {was.get('vocab_pad_multiple')}), this run's model "
        f"{rows} (model.vocab_size={model_cfg.vocab_size}, model.vocab_pad_multiple={model_cfg.vocab_pad_multiple}); "
        f"resume with model.vocab_pad_multiple={was.get('vocab_pad_multiple')}", key="model.vocab_pad_multiple")


def load(engine: Any, path: str | Path, *, plan_fingerprint: str | None = None, checksums: bool = True,
         model_cfg: Any | None = None) -> dict[str, Any]:
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
    client_state = json.loads((path / CLIENT_STATE).read_text())
    saved_fp = manifest.get("plan_fingerprint")
    same_layout = plan_fingerprint is None or saved_fp == plan_fingerprint
    if not same_layout:
        log.warning(f"re-sharding {path}: saved under {client_state.get('layout')}, loading under "
                    f"{layout_of(engine.plan)}")
    ckpt = PortableCheckpoint(path)
    if model_cfg is not None:
        check_vocab_rows(path, ckpt, client_state, model_cfg)
    reshard.restore(engine, ckpt)
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
