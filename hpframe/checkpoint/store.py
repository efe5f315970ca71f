"""Crash-safe checkpoint directories: staging, checksum manifest, atomic commit, pruning, discovery.

Layout under a checkpoint root::

    root/
      step_00000100/            one committed checkpoint (any files, any depth)
        MANIFEST.json           {"version", "step", "files": {relpath: {"bytes", "sha256"}}} written last
      step_00000200/
      latest                    text file holding the newest committed directory name, moved last
      .staging-step_00000300/   a save in progress (never read; removed by the next save or prune)

A save writes everything into a staging directory, fsyncs every file, writes the manifest, renames the
staging directory into place, and only then moves ``latest``. A process killed at any point leaves
every previously committed checkpoint intact, and at worst a staging directory that readers ignore.
Pure standard library: importable without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "MANIFEST.json"
LATEST = "latest"
STAGING_PREFIX = ".staging-"
_TAG_RE = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, incomplete or corrupted. Names the file at fault."""


def tag_for_step(step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:08d}"


def step_of_tag(tag: str) -> int | None:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def staging_path(root: Path, tag: str) -> Path:
    return Path(root) / f"{STAGING_PREFIX}{tag}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or directory (a directory: its entries, e.g. after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, step: int, extra: dict | None = None) -> dict:
    """Checksum every file under ``directory``, fsync them, and write MANIFEST.json (fsynced) last."""
    directory = Path(directory)
    files = {}
    for p in _files(directory):
        fsync_path(p)
        files[p.relative_to(directory).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"version": 1, "step": step, "files": files, **(extra or {})}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    fsync_path(tmp)
    os.replace(tmp, directory / MANIFEST)
    for d in sorted({p.parent for p in _files(directory)} | {directory}):
        fsync_path(d)
    return manifest


def verify(directory: Path, *, checksums: bool = True) -> dict:
    """Check a committed checkpoint against its manifest; return the manifest or raise CheckpointError."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (incomplete save, or not an hpframe checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{mpath}: unreadable manifest ({err})") from err
    for rel, meta in manifest["files"].items():
        p = directory / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{p}: {size} bytes on disk, manifest says {meta['bytes']} (truncated?)")
        if checksums and _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{p}: sha256 differs from the manifest (corrupted)")
    return manifest


def commit(root: Path, tag: str) -> Path:
    """Atomically move the staging directory of ``tag`` into place and point ``latest`` at it."""
    root = Path(root)
    src, dst = staging_path(root, tag), root / tag
    if not (src / MANIFEST).is_file():
        raise CheckpointError(f"{src}: cannot commit a staging directory without {MANIFEST}")
    if dst.exists():  # a previous run saved the same step; the new save replaces it
        shutil.rmtree(dst)
    os.replace(src, dst)
    fsync_path(root)
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(tag + "\n")
    fsync_path(tmp)
    os.replace(tmp, root / LATEST)
    fsync_path(root)
    return dst


def committed(root: Path) -> list[Path]:
    """Committed checkpoint directories (having a manifest), oldest first by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step_of_tag(p.name), p) for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]


@dataclass(frozen=True)
class Found:
    path: Path
    step: int
    skipped: tuple[str, ...]  # "path: reason" for newer checkpoints that failed verification


def find_latest_good(root: Path, *, checksums: bool = True) -> Found | None:
    """The newest checkpoint that verifies, falling back past corrupted ones (reasons returned)."""
    skipped: list[str] = []
    for path in reversed(committed(root)):
        try:
            manifest = verify(path, checksums=checksums)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        return Found(path=path, step=int(manifest["step"]), skipped=tuple(skipped))
    return None


def prune(root: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` committed checkpoints and stale staging dirs."""
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(STAGING_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if keep_last > 0:
        for p in committed(root)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed
