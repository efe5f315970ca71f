"""Token sources and the sequence view the loader samples from.

On-disk format (written by ``python -m hpframe.data.prepare``), one directory::

    meta.json            {"format": "hpframe.tokens", "version": 1, "dtype": "uint16" | "uint32",
                          "vocab_size": V, "eos_id": id, "num_tokens": N,
                          "shards": [{"path": "shard_00000.bin", "num_tokens": n}, ...],
                          "tokenizer": "tokenizer.json", "sources": [...]}
    shard_00000.bin      raw little-endian token ids, memory-mapped at read time
    tokenizer.json       the `tokenizers` tokenizer that produced the ids

The shards are one token stream in order. A sequence ``i`` of length S covers tokens
``[i*S, i*S + S + 1)``: S inputs plus the next token as the last target, so consecutive sequences
share one token. The last ``eval_fraction`` of the sequences is held out for evaluation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from hpframe.errors import UserError

FORMAT = "hpframe.tokens"
VERSION = 1
META_FILE = "meta.json"


class TokenSource(Protocol):
    """A read-only token stream."""

    num_tokens: int

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64."""
        ...


class ArrayTokens:
    """A token stream held in memory (the synthetic corpus)."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = tokens
        self.num_tokens = int(tokens.shape[0])

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start : start + length].astype(np.int64)


class DataError(UserError):
    """A tokenized dataset that cannot be read as meta.json describes it; the message names the file."""


def read_meta(path: str | Path) -> dict:
    """Load and check ``meta.json`` of a tokenized dataset directory."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise DataError(
            f"data.path={str(path)!r} has no {META_FILE}; write one with `python -m hpframe.data.prepare INPUT... --out DIR`"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (type(meta).__name__, None)
        raise DataError(f"{meta_path}: format {got[0]!r} v{got[1]}, expected {FORMAT!r} v{VERSION}")
    for key, kind in (("dtype", str), ("vocab_size", int), ("shards", list)):
        if not isinstance(meta.get(key), kind):
            raise DataError(f"{meta_path}: field {key!r} is missing or not a {kind.__name__}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{meta_path}: dtype {meta['dtype']!r}, expected 'uint16' or 'uint32'")
    return meta


def shard_file(root: Path, entry: object, meta_path: Path) -> tuple[Path, int]:
    """The file and token count of one ``shards`` entry, confined to the dataset directory ``root``.

    An absolute path, a ``..`` component or a symbolic link that leads outside ``root`` is refused:
    meta.json only ever names files of its own directory.
    """
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("num_tokens"), int):
        raise DataError(f"{meta_path}: shard entry {entry!r} needs a string 'path' and an integer 'num_tokens'")
    rel, count = Path(entry["path"]), entry["num_tokens"]
    inside = root.resolve()
    full = (root / rel).resolve()
    if rel.is_absolute() or ".." in rel.parts or not full.is_relative_to(inside) or full == inside:
        raise DataError(f"{meta_path}: shard path {entry['path']!r} leads outside the dataset directory {inside}")
    if count < 0:
        raise DataError(f"{meta_path}: shard {entry['path']!r} has num_tokens={count} < 0")
    return full, count


class ShardedTokens:
    """The memory-mapped shards of a tokenized dataset directory, read as one stream.

    Every shard is checked when the dataset is opened (inside the directory, present, exactly
    ``num_tokens`` ids long) and every read checks its ids against the vocabulary of meta.json, so a
    damaged dataset stops with an error naming the file instead of an IndexError deep in the model.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        meta_path = self.path / META_FILE
        dtype = np.dtype(self.meta["dtype"])
        self.files: list[Path] = []
        self.shards: list[np.ndarray] = []
        for entry in self.meta["shards"]:
            file, count = shard_file(self.path, entry, meta_path)
            if not file.is_file():
                raise DataError(f"{file}: shard listed in {meta_path} is missing")
            size, want = file.stat().st_size, count * dtype.itemsize
            if size != want:
                raise DataError(
                    f"{file}: {size} bytes, but {meta_path} says {count} {dtype.name} tokens ({want} bytes); "
                    f"the shard is {'truncated' if size < want else 'longer than described'}"
                )
            self.files.append(file)
            self.shards.append(np.memmap(file, dtype=dtype, mode="r", shape=(count,)) if count else np.empty(0, dtype))
        # offsets[k] = first global token index of shard k; offsets[-1] = total
        self.offsets = np.cumsum([0] + [s.shape[0] for s in self.shards])
        self.num_tokens = int(self.offsets[-1])
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_id = int(self.meta["eos_id"]) if isinstance(self.meta.get("eos_id"), int) else None

    def read(self, start: int, length: int) -> np.ndarray:
        assert 0 <= start and start + length <= self.num_tokens, (start, length, self.num_tokens)
        pieces = []
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while length > 0:
            lo = start - int(self.offsets[k])
            take = min(length, self.shards[k].shape[0] - lo)
            piece = np.asarray(self.shards[k][lo : lo + take], dtype=np.int64)
            self._check_ids(piece, k, lo)
            pieces.append(piece)
            start, length, k = start + take, length - take, k + 1
        return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]

    def _check_ids(self, ids: np.ndarray, shard: int, first: int) -> None:
        """Raise DataError naming the shard when an id is outside [0, vocab_size)."""
        if ids.size and int(ids.max()) >= self.vocab_size:
            at = int(np.argmax(ids >= self.vocab_size))
            raise DataError(
                f"{self.files[shard]}: token id {int(ids[at])} at position {first + at} is outside the vocabulary "
                f"of {self.vocab_size} ids (meta.json vocab_size); the shard is damaged or was written by another tokenizer"
            )


@dataclass(frozen=True)
class SequenceSplit:
    """Sequences ``first .. first + num_sequences - 1`` of a token stream, each ``seq_len + 1`` tokens."""

    source: TokenSource
    seq_len: int
    first: int
    num_sequences: int

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_sequences:
            raise IndexError(index)
        return self.source.read((self.first + index) * self.seq_len, self.seq_len + 1)

    def batch(self, indices: np.ndarray) -> np.ndarray:
        """Sequences at ``indices`` stacked: int64 [len(indices), seq_len + 1]."""
        return np.stack([self[int(i)] for i in indices])


def all_sequences(source: TokenSource, seq_len: int, what: str) -> SequenceSplit:
    """Every whole sequence of a stream (a separate evaluation set, or training data that has one)."""
    total = (source.num_tokens - 1) // seq_len
    if total < 1:
        raise DataError(f"data.seq_len={seq_len}: {what} holds {source.num_tokens} tokens, less than one sequence")
    return SequenceSplit(source, seq_len, 0, total)


def split_sequences(source: TokenSource, seq_len: int, eval_fraction: float) -> tuple[SequenceSplit, SequenceSplit]:
    """Cut a stream into (train, eval) sequence splits; eval is the tail, at least one sequence."""
    total = (source.num_tokens - 1) // seq_len
    if total < 2:
        raise UserError(
            f"data.seq_len={seq_len}: the data holds {source.num_tokens} tokens, fewer than two sequences; "
            "lower data.seq_len or provide more data"
        )
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"data.eval_fraction={eval_fraction} must be in [0, 1)")
    num_eval = max(1, int(total * eval_fraction))
    num_train = total - num_eval
    return SequenceSplit(source, seq_len, 0, num_train), SequenceSplit(source, seq_len, num_train, num_eval)
