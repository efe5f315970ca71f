"""The portable checkpoint format: every logical tensor once, under its single-device name, in safetensors.

A checkpoint directory (inside the crash-safe directories of ``hpframe.checkpoint.store``)::

    step_00000040/
      client_state.json            rank 0: step, consumed tokens, data-loader position, composed config,
                                   plan and model fingerprints, the saving layout (tp, pp, dp, ep)
      tensors/rank00003.safetensors  the tensors rank 3 owns (see below); fp32, no pickle
      layout/rank00003.json        what that file holds: logical name, full shape, expert rows, Adam step,
                                   and the rank's coordinates (written after the file: its completion mark)
      rng/rank00003.json           rank 3's RNG states (python, numpy, torch CPU, CUDA), as JSON
      MANIFEST.json                sha256 of every file above (store.py), written last by rank 0

Logical tensors are the single-device ``Transformer.state_dict()`` names (``layers.2.attn.wq.weight``,
``layers.1.mlp.experts.w13`` [E, 2F, H], ``layers.1.mlp.router.expert_bias``), each in three kinds:
``param`` (the fp32 master weight; persistent buffers too), ``exp_avg`` and ``exp_avg_sq`` (Adam
moments, absent before the first optimizer step).

Every rank writes what it holds, nothing gathered (format version 2): a stored piece is a *box* of the
logical tensor (``offset`` and ``size`` per dim: the routed experts' global-id rows ``[first, last)``
on dim 0, a TP chunk along the partition dim) and, for a ZeRO partition or a data-parallel share, a
*fragment* ``flat = [lo, hi)`` of that box's row-major flattening, stored 1-D. Fragments of one box
written by different ranks are disjoint and together cover it. A file never depends on the layout that
reads it: the reader assembles any logical tensor, or any range of its rows, from the boxes and
fragments that overlap it, reading only those byte ranges. Safetensors key: ``KIND/NAME`` plus
``@first-last`` (expert rows), ``%index`` (TP chunk) and ``#lo-hi`` (fragment) where they apply.
Version 1 (written before every rank wrote: dp-rank 0 wrote gathered whole tensors or expert rows)
is the special case of whole boxes, and still loads.

Errors about a checkpoint's files or contents are ``UserError`` (a ValueError; exit code 2 from
``launch.py``), each naming the file. This module is the format only (no torch.distributed): writing
one rank's part, reading the merged index, slicing a logical tensor, and the compatibility check that
names every missing, unexpected or mis-shaped tensor.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpframe.checkpoint import store
from hpframe.checkpoint.store import fsync_path
from hpframe.errors import UserError

FORMAT_VERSION = 2
KINDS = ("param", "exp_avg", "exp_avg_sq")
CLIENT_STATE = "client_state.json"


def tensor_file(rank: int) -> str:
    return f"tensors/rank{rank:05d}.safetensors"


def layout_file(rank: int) -> str:
    return f"layout/rank{rank:05d}.json"


def rng_file(rank: int) -> str:
    return f"rng/rank{rank:05d}.json"


@dataclass
class Piece:
    """One stored tensor of logical ``name`` and ``kind``, of full shape ``full_shape``.

    Its box: ``rows`` = global expert ids [first, last) on dim 0 (None: all rows), and ``tp`` = (dim,
    index, count): the ``index``-th of ``count`` equal chunks along ``dim`` (None: not split). ``flat``
    = [lo, hi) of the box's row-major flattening, ``tensor`` then 1-D (None: the whole box, shaped).
    """

    name: str
    kind: str
    tensor: torch.Tensor
    full_shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    tp: tuple[int, int, int] | None = None
    flat: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        key = f"{self.kind}/{self.name}"
        if self.rows is not None:
            key += f"@{self.rows[0]}-{self.rows[1]}"
        if self.tp is not None:
            key += f"%{self.tp[1]}"
        if self.flat is not None:
            key += f"#{self.flat[0]}-{self.flat[1]}"
        return key

    def box(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offset, size) of this piece's box in the full tensor."""
        offset, size = [0] * len(self.full_shape), list(self.full_shape)
        if self.rows is not None:
            offset[0], size[0] = self.rows[0], self.rows[1] - self.rows[0]
        if self.tp is not None:
            dim, index, count = self.tp
            size[dim] = self.full_shape[dim] // count
            offset[dim] = index * size[dim]
        return tuple(offset), tuple(size)


@dataclass
class RankPart:
    """What one rank writes: its pieces, the Adam step of each logical tensor, its layout coordinates."""

    rank: int
    pieces: list[Piece] = field(default_factory=list)
    adam_step: dict[str, float] = field(default_factory=dict)
    coords: dict[str, int] = field(default_factory=dict)
    copied: Any = field(default=None, repr=False, compare=False)
    """CUDA event after which the pieces' host copies are complete (checkpoint/host_copy.py); None: they are."""

    def wait_copied(self) -> None:
        """Block until the pieces hold their values (before anything reads them)."""
        if self.copied is not None:
            self.copied.synchronize()


def layout_doc(part: RankPart) -> dict[str, Any]:
    """The layout JSON of ``part``: every piece's logical name, kind, full shape, box and fragment."""
    entries = {}
    for p in part.pieces:
        offset, size = p.box()
        entries[p.key] = {"name": p.name, "kind": p.kind, "shape": list(p.full_shape), "dtype": str(p.tensor.dtype).removeprefix("torch."),
                          "rows": list(p.rows) if p.rows is not None else None,
                          "box": {"offset": list(offset), "size": list(size)},
                          "flat": list(p.flat) if p.flat is not None else None}
    return {
        "version": FORMAT_VERSION,
        "rank": part.rank,
        "coords": part.coords,
        "file": tensor_file(part.rank),
        "tensors": entries,
        "expert_rows": sorted({tuple(p.rows) for p in part.pieces if p.rows is not None}),
        "adam_step": part.adam_step,
    }


_METADATA = {"format": "hpframe-portable", "version": str(FORMAT_VERSION)}


def save_tensors(part: RankPart, path: Path) -> None:
    """Write ``part``'s safetensors file to ``path`` (straight from its host buffers: safetensors'
    ``save_file``; building the file's bytes in memory first with ``save`` took 5.5x as long,
    docs/performance.md section 14)."""
    from safetensors.torch import save_file

    part.wait_copied()
    save_file({p.key: p.tensor.contiguous() for p in part.pieces}, str(path), metadata=_METADATA)


def write_part(directory: Path, part: RankPart) -> list[Path]:
    """Write ``part``'s safetensors file, then its layout JSON (the completion mark); returns both paths."""
    directory = Path(directory)
    tpath, lpath = directory / tensor_file(part.rank), directory / layout_file(part.rank)
    tpath.parent.mkdir(parents=True, exist_ok=True)
    lpath.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(part, tpath)
    fsync_path(tpath)
    tmp = lpath.with_suffix(".tmp")
    tmp.write_text(json.dumps(layout_doc(part), indent=1, sort_keys=True))
    fsync_path(tmp)
    os.replace(tmp, lpath)
    return [tpath, lpath]


def parts_written(directory: Path) -> set[int]:
    """Ranks whose layout JSON (written after their tensors) exists under ``directory``."""
    d = Path(directory) / "layout"
    return {int(p.stem.removeprefix("rank")) for p in d.glob("rank*.json")} if d.is_dir() else set()


@dataclass
class _Stored:
    """Where one piece lives: file, safetensors key, box (offset, size), fragment [lo, hi) or None (whole box)."""

    file: str
    key: str
    offset: tuple[int, ...]
    size: tuple[int, ...]
    flat: tuple[int, int] | None


def _stored(file: str, key: str, meta: dict[str, Any], shape: tuple[int, ...]) -> _Stored:
    """A layout entry as a box; version 1 entries (no ``box``) are whole tensors or expert rows."""
    if meta.get("box") is not None:
        offset, size = tuple(meta["box"]["offset"]), tuple(meta["box"]["size"])
    else:
        offset, size = (0,) * len(shape), shape
        if meta.get("rows") is not None:
            a, b = meta["rows"]
            offset, size = (a, *offset[1:]), (b - a, *shape[1:])
    flat = tuple(meta["flat"]) if meta.get("flat") is not None else None
    return _Stored(file, key, offset, size, flat)  # type: ignore[arg-type]


def listed_files(directory: Path) -> set[str]:
    """The files of a committed checkpoint that its MANIFEST.json lists; ValueError naming any other file.

    Only listed files (whose sizes and checksums ``store.verify`` checks) are ever read: a file added
    to a committed checkpoint afterwards (an extra layout JSON and tensors file) would otherwise join
    the merged index and change the loaded weights.
    """
    directory = Path(directory)
    try:
        manifest = store.verify(directory, checksums=False)
    except store.CheckpointError as err:
        raise UserError(str(err)) from err
    listed = set(manifest["files"])
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and rel != store.MANIFEST and rel not in listed:
            raise UserError(f"{p}: not listed in {directory / store.MANIFEST} (added after the save?); "
                             f"refusing to load a checkpoint with unlisted files")
    return listed


def _only(directory: Path, files: set[str]) -> set[str]:
    """``files``, after checking that they exist and that ``directory`` holds nothing else."""
    for rel in sorted(files):
        if not (directory / rel).is_file():
            raise UserError(f"{directory / rel}: listed but missing")
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.relative_to(directory).as_posix() not in files:
            raise UserError(f"{p}: not listed in the snapshot's commit records; refusing to load it")
    return set(files)


class PortableCheckpoint:
    """Read side: the merged index of every rank's layout JSON; tensors read lazily by slice.

    Only a committed checkpoint is read, and only the files its manifest lists (``listed_files``).
    Safetensors files are memory-mapped headers plus raw bytes: reading never executes code.
    """

    def __init__(self, directory: str | Path, *, files: set[str] | None = None) -> None:
        """``files``: the listing to trust instead of MANIFEST.json (the fast tier's commit records)."""
        self.directory = Path(directory)
        listed = listed_files(self.directory) if files is None else _only(self.directory, files)
        layouts = [self.directory / rel for rel in sorted(listed)
                   if rel.startswith("layout/rank") and rel.endswith(".json")]
        if not layouts:
            raise UserError(f"{self.directory}: no layout/rank*.json: not a portable hpframe checkpoint")
        self.shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        self.stored: dict[tuple[str, str], list[_Stored]] = {}
        self.adam_step: dict[str, float] = {}
        self.saved_coords: dict[int, dict[str, int]] = {}
        for path in layouts:
            doc = json.loads(path.read_text())
            if doc["file"] not in listed:
                raise UserError(f"{path}: names {doc['file']}, which {store.MANIFEST} does not list")
            self.saved_coords[int(doc["rank"])] = doc["coords"]
            self.adam_step.update(doc["adam_step"])
            for key, meta in doc["tensors"].items():
                lk = (meta["kind"], meta["name"])
                shape = tuple(meta["shape"])
                if self.shapes.setdefault(lk, shape) != shape:
                    raise UserError(f"{path}: {meta['name']} ({meta['kind']}) has shape {shape}, another file says {self.shapes[lk]}")
                self.stored.setdefault(lk, []).append(_stored(doc["file"], key, meta, shape))
        self._handles: dict[str, Any] = {}
        self._gate_up: dict[tuple[str, str], tuple[tuple[str, str], tuple[str, str]]] = {}
        self._merge_split_gate_up()

    def _merge_split_gate_up(self) -> None:
        """Checkpoints written before SwiGLU experts held one packed ``w13`` [E, 2F, H] store ``w1`` and
        ``w3`` [E, F, H]: they read as ``w13`` (gate rows, then up rows), so such checkpoints still load."""
        for kind, name in list(self.shapes):
            if not name.endswith(".experts.w1"):
                continue
            base = name[: -len("w1")]
            w1, w3, w13 = (kind, name), (kind, base + "w3"), (kind, base + "w13")
            if w3 not in self.shapes or w13 in self.shapes:
                continue
            s1, s3 = self.shapes.pop(w1), self.shapes.pop(w3)
            if s1 != s3:
                raise UserError(f"{self.directory}: {name} {list(s1)} and {base}w3 {list(s3)} differ in shape")
            self.shapes[w13] = (s1[0], 2 * s1[1], *s1[2:])
            self._gate_up[w13] = (w1, w3)
            if kind == "param":
                step = self.adam_step.get(name)
                if step is not None:
                    self.adam_step[base + "w13"] = step

    def stored_shape(self, lk: tuple[str, str]) -> tuple[int, ...]:
        """Full shape of a stored logical tensor (also of a split w1/w3 that reads as w13)."""
        if lk in self.shapes:
            return self.shapes[lk]
        for w13, parts in self._gate_up.items():
            if lk in parts:
                s = self.shapes[w13]
                return (s[0], s[1] // 2, *s[2:])
        raise KeyError(f"{self.directory}: no {lk[0]} tensor {lk[1]!r}")

    def names(self, kind: str = "param") -> set[str]:
        return {n for k, n in self.shapes if k == kind}

    def has(self, name: str, kind: str = "param") -> bool:
        return (kind, name) in self.shapes

    def _open(self, file: str) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            path = self.directory / file
            try:
                self._handles[file] = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own error types for damaged headers
                raise UserError(f"{path}: unreadable safetensors file ({err})") from err
        return self._handles[file]

    def read(self, name: str, kind: str = "param", rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The logical tensor ``name`` (or its dim-0 rows [first, last)), assembled from the stored pieces."""
        lk = (kind, name)
        if lk in self._gate_up:  # an older checkpoint's w1 and w3, packed
            return torch.cat([self._read(part, rows) for part in self._gate_up[lk]], dim=1)
        if lk not in self.stored:
            raise KeyError(f"{self.directory}: no {kind} tensor {name!r}")
        return self._read(lk, rows)

    def _read(self, lk: tuple[str, str], rows: tuple[int, int] | None) -> torch.Tensor:
        kind, name = lk
        shape = self.stored_shape(lk)
        if not shape:  # a 0-d tensor: one whole piece
            s = self.stored[lk][0]
            return self._open(s.file).get_tensor(s.key)
        first, last = rows if rows is not None else (0, shape[0])
        out: torch.Tensor | None = None
        covered = 0
        boxes: dict[tuple[tuple[int, ...], tuple[int, ...]], list[_Stored]] = {}
        for s in self.stored[lk]:
            boxes.setdefault((s.offset, s.size), []).append(s)
        for (offset, size), pieces in boxes.items():
            a, b = max(first, offset[0]), min(last, offset[0] + size[0])
            if a >= b:  # no requested row in this box: its file is not read
                continue
            t = self._box_rows(lk, offset, size, pieces, a, b)
            if out is None:
                out = torch.empty((last - first, *shape[1:]), dtype=t.dtype)
            region = (slice(a - first, b - first), *(slice(o, o + n) for o, n in zip(offset[1:], size[1:])))
            out[region] = t
            covered += t.numel()
        if out is None or covered != out.numel():
            raise UserError(f"{self.directory}: {kind} {name} rows [{first}, {last}) are not all stored "
                             f"({covered} of {(last - first) * math.prod(shape[1:])} elements; files missing?)")
        return out

    def _box_rows(self, lk: tuple[str, str], offset: tuple[int, ...], size: tuple[int, ...], pieces: list[_Stored],
                  a: int, b: int) -> torch.Tensor:
        """Rows [a, b) (full-tensor row ids) of one box, from its whole piece or its fragments."""
        lo_row, hi_row = a - offset[0], b - offset[0]
        whole = [s for s in pieces if s.flat is None]
        if whole:
            return self._open(whole[0].file).get_slice(whole[0].key)[lo_row:hi_row]
        row = math.prod(size[1:])
        need = (lo_row * row, hi_row * row)  # the rows' span of the box's flattening
        buf: torch.Tensor | None = None
        got = 0
        for s in pieces:
            assert s.flat is not None
            x, y = max(need[0], s.flat[0]), min(need[1], s.flat[1])
            if x >= y:
                continue
            frag = self._open(s.file).get_slice(s.key)[x - s.flat[0]:y - s.flat[0]]
            if buf is None:
                buf = torch.empty(need[1] - need[0], dtype=frag.dtype)
            buf[x - need[0]:y - need[0]] = frag
            got += y - x
        if buf is None or got != need[1] - need[0]:
            raise UserError(f"{self.directory}: {lk[0]} {lk[1]}: the fragments of box offset {list(offset)} size {list(size)} "
                             f"cover {got} of elements [{need[0]}, {need[1]}) (a rank's part missing?)")
        return buf.view(hi_row - lo_row, *size[1:])

    def check_compatible(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Raise ValueError naming every missing, unexpected and mis-shaped parameter (no partial loads)."""
        have = {n: self.shapes[("param", n)] for n in self.names("param")}
        missing = sorted(set(expected) - set(have))
        unexpected = sorted(set(have) - set(expected))
        wrong = sorted(f"{n}: checkpoint {list(have[n])} vs model {list(expected[n])}"
                       for n in set(have) & set(expected) if tuple(have[n]) != tuple(expected[n]))
        if missing or unexpected or wrong:
            lines = [f"checkpoint {self.directory} does not fit this model (model.* / moe.* differ from the saved run):"]
            for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
                if items:
                    shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                    lines.append(f"  {title}: {shown}")
            raise UserError("\n".join(lines))


# ---- RNG states as JSON (no pickle) ------------------------------------------------------------------
def rng_state_json() -> dict[str, Any]:
    """This process's python, numpy, torch CPU (and CUDA) RNG states as JSON-able values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state_json(state: dict[str, Any]) -> None:
    """Restore what ``rng_state_json`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_json(path: Path, doc: Any) -> None:
    """Write JSON durably (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str))
    fsync_path(tmp)
    os.replace(tmp, path)


def checkpoint_bytes(directory: Path) -> int:
    """Bytes of the tensor files of a checkpoint (what the planner's estimate describes)."""
    return sum(p.stat().st_size for p in (Path(directory) / "tensors").glob("*.safetensors"))
