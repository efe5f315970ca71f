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


def read_meta(path: str | Path) -> dict:
    """Load and check ``meta.json`` of a tokenized dataset directory."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise UserError(
            f"data.path={str(path)!r} has no {META_FILE}; write one with `python -m hpframe.data.prepare INPUT... --out DIR`"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UserError(f"{meta_path}: format {meta.get('format')!r} v{meta.get('version')}, expected {FORMAT!r} v{VERSION}")
    return meta


class ShardedTokens:
    """The memory-mapped shards of a tokenized dataset directory, read as one stream."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta = read_meta(self.path)
        dtype = np.dtype(self.meta["dtype"])
        self.shards = [np.memmap(self.path / s["path"], dtype=dtype, mode="r", shape=(s["num_tokens"],)) for s in self.meta["shards"]]
        # offsets[k] = first global token index of shard k; offsets[-1] = total
        self.offsets = np.cumsum([0] + [s.shape[0] for s in self.shards])
        self.num_tokens = int(self.offsets[-1])
        self.vocab_size = int(self.meta["vocab_size"])

    def read(self, start: int, length: int) -> np.ndarray:
        assert 0 <= start and start + length <= self.num_tokens, (start, length, self.num_tokens)
        pieces = []
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while length > 0:
            lo = start - int(self.offsets[k])
            take = min(length, self.shards[k].shape[0] - lo)
            pieces.append(np.asarray(self.shards[k][lo : lo + take], dtype=np.int64))
            start, length, k = start + take, length - take, k + 1
        return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]


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
