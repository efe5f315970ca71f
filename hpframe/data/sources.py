"""Text inputs of ``hpframe.data.prepare``: which files, how documents are read, and their encoding.

Inputs are files, directories (searched recursively) and glob patterns. A file's format comes from its
name unless ``--format`` says otherwise:

    *.jsonl, *.ndjson    JSON Lines: one document per line, the string field ``field`` (default ``text``)
    *.parquet            Parquet: one document per row, the string column ``field`` (needs pyarrow)
    anything else        plain UTF-8 text: the whole file is one document

A directory contributes its files with one of the suffixes in ``DIRECTORY_SUFFIXES``. Files are
streamed in work units of about ``UNIT_BYTES`` (lines, or Parquet record batches), so a file larger
than memory is fine; ``encode_unit`` turns one unit into token ids and runs in a worker process.
Every error names the file and the line (or row) and is a ``DataError``.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from hpframe.data.dataset import DataError

FORMATS = ("auto", "text", "jsonl", "parquet")
DIRECTORY_SUFFIXES = {".txt", ".md", ".text", ".jsonl", ".ndjson", ".parquet"}
UNIT_BYTES = 1 << 20
"""Bytes of input per work unit: big enough to keep a worker busy, small enough to stream."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # text | jsonl | parquet


@dataclass(frozen=True)
class Unit:
    """A slice of one input file: raw lines (text, jsonl) or strings (parquet rows)."""

    path: str
    kind: str
    first: int
    """1-based line number (text, jsonl) or 0-based row (parquet) of ``items[0]``."""
    items: list
    ends_file: bool
    num_bytes: int


def file_kind(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    return "parquet" if suffix == ".parquet" else "text"


def discover(inputs: list[str], fmt: str = "auto") -> list[InputFile]:
    """Expand files, directories and glob patterns into the input files, in a stable order."""
    if fmt not in FORMATS:
        raise DataError(f"--format={fmt!r}: expected one of {', '.join(FORMATS)}")
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if any(c in item for c in "*?[") and not path.exists():
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"input pattern {item!r} matches no file")
            found.extend(matches)
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DIRECTORY_SUFFIXES)
            if not matches:
                raise DataError(f"input directory {item!r} holds no file ending in {', '.join(sorted(DIRECTORY_SUFFIXES))}")
            found.extend(matches)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"input {item!r} not found")
    return [InputFile(p, file_kind(p, fmt)) for p in dict.fromkeys(found)]


def total_bytes(files: list[InputFile]) -> int:
    return sum(f.path.stat().st_size for f in files)


def _line_units(f: InputFile) -> Iterator[Unit]:
    lines: list[bytes] = []
    size, first, number = 0, 1, 0
    with open(f.path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            lines.append(line)
            size += len(line)
            if size >= UNIT_BYTES:
                yield Unit(str(f.path), f.kind, first, lines, False, size)
                lines, size, first = [], 0, number + 1
    yield Unit(str(f.path), f.kind, first, lines, True, size)


def _parquet_units(f: InputFile, field: str) -> Iterator[Unit]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{f.path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(f.path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid for a file that is not Parquet
        raise DataError(f"{f.path}: not a readable Parquet file ({err})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(f"{f.path}: no column {field!r} (columns: {', '.join(names)}); choose one with --field")
    row = 0
    file_bytes = f.path.stat().st_size
    num_rows = max(1, pf.metadata.num_rows)
    for batch in pf.iter_batches(batch_size=4096, columns=[field]):
        items = batch.column(0).to_pylist()
        yield Unit(str(f.path), f.kind, row, items, False, file_bytes * len(items) // num_rows)
        row += len(items)
    yield Unit(str(f.path), f.kind, row, [], True, 0)


def units(files: list[InputFile], field: str) -> Iterator[Unit]:
    """The work units of every file in order; a file's last unit has ``ends_file``."""
    for f in files:
        yield from (_parquet_units(f, field) if f.kind == "parquet" else _line_units(f))


def _decode(raw: bytes, path: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: line {line} is not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}: {err.reason}); "
            "convert the file to UTF-8 first"
        ) from None


def unit_documents(unit: Unit, field: str) -> list[str]:
    """The texts of one unit: for text files, its lines (pieces of one document); else one per document."""
    if unit.kind == "text":
        return [_decode(raw, unit.path, unit.first + i) for i, raw in enumerate(unit.items)]
    if unit.kind == "parquet":
        docs = []
        for i, item in enumerate(unit.items):
            if isinstance(item, bytes):
                item = _decode(item, unit.path, unit.first + i)
            if not isinstance(item, str):
                raise DataError(f"{unit.path}: row {unit.first + i}: column {field!r} is {item!r}, not a string")
            docs.append(item)
        return docs
    docs = []
    for i, raw in enumerate(unit.items):
        number = unit.first + i
        text = _decode(raw, unit.path, number)
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{unit.path}: line {number} is not valid JSON ({err.msg} at column {err.colno})") from None
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{unit.path}: line {number} has no string field {field!r} (found: {keys}); choose one with --field")
        docs.append(value)
    return docs


# ---- worker side: one tokenizer per process -------------------------------------------------------
_WORKER: dict = {}


def init_worker(tokenizer_json: str, eos_id: int, bos_id: int | None, field: str, threads: int = 0) -> None:
    """Pool initializer (also called in-process when there are no workers). ``threads`` > 0: the
    `tokenizers` library's thread pool of this process (its cores' share, so N workers do not each
    start one thread per core); set before the first encode, when the library reads it."""
    import os

    if threads > 0:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(tokenizer_json), eos=eos_id, bos=bos_id, field=field)


def encode_unit(unit: Unit) -> tuple[np.ndarray, int]:
    """Token ids of one unit (uint32) and the number of documents it completes.

    JSON Lines and Parquet: every non-empty document is ``[bos] ids eos``. Text: the lines' ids only;
    the caller adds the separators around the whole file (``bos`` before, ``eos`` after).
    """
    tok, eos, bos = _WORKER["tok"], _WORKER["eos"], _WORKER["bos"]
    texts = unit_documents(unit, _WORKER["field"])
    encoded = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)] if texts else []
    if unit.kind == "text":
        flat = [i for ids in encoded for i in ids]
        return np.asarray(flat, dtype=np.uint32), 0
    out: list[int] = []
    docs = 0
    for ids in encoded:
        if ids:
            out.extend(([bos] if bos is not None else []) + ids + [eos])
            docs += 1
    return np.asarray(out, dtype=np.uint32), docs


def iter_texts(files: list[InputFile], field: str) -> Iterator[str]:
    """Every text of the inputs in order (tokenizer training reads these)."""
    for unit in units(files, field):
        yield from unit_documents(unit, field)
