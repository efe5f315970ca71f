"""Crash-safe checkpoint directories: staging, checksum manifest, atomic commit, lines, resume choice, pruning.

Layout under a checkpoint root::

    root/
      step_00000100/            one committed checkpoint (any files, any depth)
        MANIFEST.json           {"version", "step", "line", "parent", "files": {relpath: {"bytes", "sha256"}}} written last
      step_00000200/
      latest                    text file holding the newest committed directory name, moved last
      .staging-step_00000300/   a save in progress or killed (never read; removed before the next save)

A save writes everything into a staging directory, fsyncs every file, writes the manifest, renames the
staging directory into place, and only then moves ``latest``. A process killed at any point leaves
every previously committed checkpoint intact, and at worst a staging directory that readers ignore.

Lines. Every checkpoint's manifest names its ``line``: an id shared by the saves of one uninterrupted
succession of training (a run, and runs resumed from the checkpoint ``latest`` named), and its
``parent``: ``{"line", "step"}`` of the checkpoint the line started from (null for a line started from
scratch). Starting from scratch, or resuming from any checkpoint other than the one ``latest`` names
(an explicit older path, or a fallback past a damaged ``latest``), starts a new line. The *lineage* of
a checkpoint is its line's checkpoints up to its step, then its parent's lineage. ``latest`` is the
source of truth: resuming takes what it names, else the newest checkpoint of its lineage that
verifies; pruning counts only checkpoints of the line ``latest`` names and never removes that one.
Pure standard library: importable without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

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


def new_line_id() -> str:
    """A fresh line id (random, 12 hex digits)."""
    return secrets.token_hex(6)


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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape_error(m: Any) -> str | None:
    """Why a parsed manifest does not have the shape ``write_manifest`` writes (None if it does)."""
    if not isinstance(m, dict):
        kind = {type(None): "null", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
        return f"a JSON {kind.get(type(m), type(m).__name__)} instead of an object"
    if not _is_int(m.get("step")) or m["step"] < 0:
        return f"'step' is {m.get('step')!r}, not a step number"
    if not isinstance(m.get("files"), dict):
        return f"'files' is {type(m.get('files')).__name__}, not an object"
    for rel, meta in m["files"].items():
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or ".." in parts or "\\" in rel:
            return f"file {rel!r} lies outside the checkpoint directory"
        if not isinstance(meta, dict) or not _is_int(meta.get("bytes")) or not isinstance(meta.get("sha256"), str):
            return f"entry of {rel!r} is {meta!r}, not {{'bytes': int, 'sha256': str}}"
    if m.get("line") is not None and not isinstance(m["line"], str):
        return f"'line' is {m['line']!r}, not a string"
    parent = m.get("parent")
    if parent is not None and not (isinstance(parent, dict) and _is_int(parent.get("step"))
                                   and (parent.get("line") is None or isinstance(parent.get("line"), str))):
        return f"'parent' is {parent!r}, not {{'line': str, 'step': int}}"
    return None


def read_manifest(directory: Path) -> dict:
    """The manifest of ``directory``, checked for shape (not against the files); CheckpointError if unusable.

    Malformed content (binary bytes, ``null``, valid JSON of the wrong shape, a path leaving the
    directory, a step other than the directory's) is a failed verification, never another exception.
    """
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (incomplete save, or not an hpframe checkpoint)")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (OSError, ValueError, RecursionError) as err:  # ValueError covers bad JSON and bad UTF-8
        raise CheckpointError(f"{mpath}: unreadable manifest ({type(err).__name__}: {str(err)[:200]})") from err
    why = _shape_error(manifest)
    if why is not None:
        raise CheckpointError(f"{mpath}: malformed manifest ({why})")
    tag_step = step_of_tag(directory.name)
    if tag_step is not None and tag_step != manifest["step"]:
        raise CheckpointError(f"{mpath}: malformed manifest (step {manifest['step']} in a directory of step {tag_step})")
    return manifest


def verify(directory: Path, *, checksums: bool = True) -> dict:
    """Check a committed checkpoint against its manifest; return the manifest or raise CheckpointError."""
    directory = Path(directory)
    manifest = read_manifest(directory)
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
    if dst.exists():  # a save of the same step (another line, or a damaged one) is replaced
        shutil.rmtree(dst)
    os.replace(src, dst)
    fsync_path(root)
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(tag + "\n")
    fsync_path(tmp)
    os.replace(tmp, root / LATEST)
    fsync_path(root)
    return dst


def read_latest(root: Path) -> str | None:
    """The directory name ``latest`` holds; None without a ``latest`` file; CheckpointError if it is unusable."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    try:
        name = path.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from err
    if step_of_tag(name) is None:
        raise CheckpointError(f"{path}: holds {name[:80]!r}, not a checkpoint directory name")
    return name


def committed(root: Path) -> list[Path]:
    """Committed checkpoint directories (having a manifest), oldest first by step."""
    return [p for p in checkpoint_dirs(root) if (p / MANIFEST).is_file()]


def checkpoint_dirs(root: Path) -> list[Path]:
    """Every ``step_N`` directory under ``root`` (committed or damaged), oldest first by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step_of_tag(p.name), p) for p in root.iterdir() if p.is_dir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None)]


def remove_staging(root: Path) -> list[Path]:
    """Remove every staging directory under ``root`` (saves that died); call when no save is in flight."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STAGING_PREFIX)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


@dataclass(frozen=True)
class Entry:
    """One ``step_N`` directory: its manifest when that reads, else why not."""

    path: Path
    step: int
    manifest: dict | None
    error: str | None

    @property
    def line(self) -> str | None:
        return None if self.manifest is None else self.manifest.get("line")


def scan(root: Path) -> list[Entry]:
    """Every checkpoint directory under ``root`` with its shape-checked manifest (no file is checksummed)."""
    out = []
    for p in checkpoint_dirs(root):
        try:
            out.append(Entry(p, int(step_of_tag(p.name) or 0), read_manifest(p), None))
        except CheckpointError as err:
            out.append(Entry(p, int(step_of_tag(p.name) or 0), None, str(err)))
    return out


def lineage(entries: list[Entry], head: Entry) -> list[Entry]:
    """The checkpoints of ``head``'s lineage other than ``head``, newest first (see the module docstring).

    ``head`` of an unknown line (its manifest unreadable, or written before lines existed): every
    checkpoint of a lower step, since nothing tells which line they belong to.
    """
    if head.line is None:
        return sorted((e for e in entries if e.step < head.step), key=lambda e: -e.step)
    out: list[Entry] = []
    line, bound, parent = head.line, head.step, (head.manifest or {}).get("parent")
    seen: set[str] = set()
    while line is not None and line not in seen:
        seen.add(line)
        out += sorted((e for e in entries if e.line == line and e.step <= bound and e.path != head.path), key=lambda e: -e.step)
        if parent is None:
            break
        line, bound = parent.get("line"), parent["step"]
        parent = next((e.manifest.get("parent") for e in entries if e.manifest is not None and e.line == line), None)
    return out


@dataclass(frozen=True)
class Selection:
    """The checkpoint to resume from, and what was passed over on the way (for the log)."""

    path: Path
    step: int
    manifest: dict
    from_latest: bool
    """True when it is the checkpoint ``latest`` names (the run continues that line)."""
    skipped: tuple[str, ...]
    """Why each checkpoint tried before it was not taken (``latest`` first), in order."""


def _unusable(root: Path, entries: list[Entry], why: dict[Path, str], latest: str | None) -> CheckpointError:
    """The refusal when checkpoints exist but none can be resumed: every one, with its reason."""
    lines = [why[root / LATEST]] if root / LATEST in why else []
    for e in entries:
        reason = why.get(e.path) or e.error
        if reason is None:
            reason = f"{e.path}: line {e.line}, not in the lineage of {latest} (a branch that {LATEST} does not continue)"
        lines.append(reason)
    return CheckpointError(
        f"{root}: {len(entries)} checkpoint(s), none usable for resuming:\n  " + "\n  ".join(lines)
        + "\nResume one explicitly (checkpoint.resume=PATH), or start over with checkpoint.resume=none"
    )


def select_for_resume(root: Path, *, checksums: bool = True) -> Selection | None:
    """What ``checkpoint.resume=auto`` takes: the checkpoint ``latest`` names when it verifies, else the
    newest verified checkpoint of its lineage. None when ``root`` holds no checkpoint and no ``latest``.

    Without a ``latest`` file (or with an unreadable one) every checkpoint is a candidate, newest first.
    Raises CheckpointError listing each checkpoint and why it failed when checkpoints exist but none verifies.
    """
    root = Path(root)
    entries = scan(root)
    why: dict[Path, str] = {}
    try:
        name = read_latest(root)
    except CheckpointError as err:
        name, why[root / LATEST] = None, str(err)
    if not entries and name is None and not why:
        return None
    head = next((e for e in entries if e.path.name == name), None) if name else None
    if name is not None and head is None:
        head = Entry(root / name, int(step_of_tag(name) or 0), None, f"{root / name}: named by {LATEST} but missing")
        why[root / LATEST] = f"{root / LATEST}: names {name}, which does not exist"
    if head is None:
        why.setdefault(root / LATEST, f"{root / LATEST}: missing")
        skipped = [f"{why[root / LATEST]}; taking the newest checkpoint that verifies"]
        candidates = sorted(entries, key=lambda e: -e.step)
    else:
        skipped, candidates = [], [head, *lineage(entries, head)]
    for e in candidates:
        try:
            if e.error is not None:
                raise CheckpointError(e.error)
            manifest = verify(e.path, checksums=checksums)
        except CheckpointError as err:
            why[e.path] = str(err)
            skipped.append(str(err))
            continue
        return Selection(e.path, e.step, manifest, from_latest=head is not None and e.path == head.path, skipped=tuple(skipped))
    raise _unusable(root, entries, why, name)


@dataclass(frozen=True)
class Found:
    path: Path
    step: int
    skipped: tuple[str, ...]  # "path: reason" for checkpoints tried first that failed verification


def find_latest_good(root: Path, *, checksums: bool = True) -> Found | None:
    """``select_for_resume`` for readers that only want a checkpoint (export): None when none is usable."""
    try:
        sel = select_for_resume(root, checksums=checksums)
    except CheckpointError:
        return None
    return None if sel is None else Found(path=sel.path, step=sel.step, skipped=sel.skipped)


def line_after_resume(root: Path, resumed: Path | None, manifest: dict | None) -> dict[str, Any]:
    """``{"line", "parent"}`` for the saves of a run that resumed from ``resumed`` (None: from scratch).

    The run continues the resumed checkpoint's line only when that checkpoint is the one ``latest``
    of ``root`` names (and has a line); anything else starts a new line whose parent is the resumed
    checkpoint.
    """
    if resumed is None or manifest is None:
        return {"line": new_line_id(), "parent": None}
    try:
        latest = read_latest(root)
    except CheckpointError:
        latest = None
    at_latest = latest is not None and Path(resumed).resolve() == (Path(root) / latest).resolve()
    if at_latest and manifest.get("line"):
        return {"line": manifest["line"], "parent": manifest.get("parent")}
    return {"line": new_line_id(), "parent": {"line": manifest.get("line"), "step": int(manifest["step"])}}


def prune(root: Path, keep_last: int) -> list[Path]:
    """Remove stale staging directories, then checkpoints of the current line beyond the newest ``keep_last``.

    The current line is the line of the checkpoint ``latest`` names. Never removed: that checkpoint,
    the newest ``keep_last`` of its line whose files are all there at their listed sizes (so the
    newest verified save survives a damaged ``latest``), and every checkpoint of another line or
    whose manifest does not read. Without a readable ``latest`` of a known line nothing committed is
    removed. ``keep_last`` <= 0 keeps every checkpoint.
    """
    root = Path(root)
    removed = remove_staging(root)
    if keep_last <= 0:
        return removed
    try:
        name = read_latest(root)
        head = read_manifest(root / name) if name is not None else None
    except CheckpointError:
        return removed
    if head is None or not head.get("line"):
        return removed
    members = sorted((e for e in scan(root) if e.line == head["line"]), key=lambda e: -e.step)
    keep, kept = {root / name}, 0
    for e in members:
        if kept >= keep_last:
            break
        try:
            verify(e.path, checksums=False)
        except CheckpointError:
            continue
        keep.add(e.path)
        kept += 1
    for e in members:
        if e.path not in keep:
            shutil.rmtree(e.path, ignore_errors=True)
            removed.append(e.path)
    return removed
