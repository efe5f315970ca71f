"""Turn local text into hpframe's tokenized-dataset format (offline).

    python -m hpframe.data.prepare INPUT... --out DIR (--tokenizer MODEL_DIR_OR_FILE | --vocab-size N)
        [--field text] [--format auto|text|jsonl|parquet] [--workers N] [--shard-tokens N]

INPUT: plain text files (one document each), JSON Lines (one document per line, the field
``--field``), Parquet (one document per row, the column ``--field``), directories or glob patterns of
them (see ``hpframe.data.sources``). Documents are packed one after the other, each closed by the
tokenizer's end-of-sequence token (and opened by its BOS when the model directory asks for one).

The tokenizer: ``--tokenizer DIR`` uses a Hugging Face model directory's tokenizer.json, unchanged, so
the ids are the model's (the directory of ``model.from_hf``); ``--tokenizer FILE`` a bare
tokenizer.json; ``--vocab-size N`` trains a byte-level BPE on the inputs (from-scratch runs). It is
saved as DIR/tokenizer.json; ids go to memory-mapped shards (uint16 when the vocabulary fits, else
uint32) described by DIR/meta.json (``hpframe.data.dataset``), written last. Inputs are streamed in
work units encoded by ``--workers`` processes, with a progress bar on a terminal.
Train with ``data=tokenized data.path=DIR``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from hpframe.data import sources
from hpframe.data.dataset import FORMAT, META_FILE, VERSION, DataError
from hpframe.data.tokenizer import EOS, LoadedTokenizer, load_tokenizer, train_bpe

__all__ = ["EOS", "main", "prepare"]


class ShardWriter:
    """Appends token ids to ``shard_NNNNN.bin`` files of at most ``shard_tokens`` ids each."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.shards: list[dict] = []
        self._fh = None
        self._count = 0

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._fh is None:
                name = f"shard_{len(self.shards):05d}.bin"
                self.shards.append({"path": name, "num_tokens": 0})
                self._fh = open(self.out / name, "wb")
            take = min(ids.size, self.shard_tokens - self._count)
            ids[:take].astype(self.dtype).tofile(self._fh)
            self._count += take
            self.shards[-1]["num_tokens"] = self._count
            ids = ids[take:]
            if self._count == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh, self._count = None, 0


def _ordered_map(fn: Callable, items: Iterator, workers: int, init: Callable, init_args: tuple) -> Iterator[tuple]:
    """(item, fn(item)) in input order, on ``workers`` processes with at most 2 x workers units in flight
    (the input is streamed, never read ahead in full); in this process when ``workers`` <= 1."""
    if workers <= 1:
        init(*init_args)
        for item in items:
            yield item, fn(item)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process whose tokenizer threads ran
    threads = max(1, (os.cpu_count() or 1) // workers)  # each worker's share of the cores
    with ctx.Pool(workers, initializer=init, initargs=(*init_args, threads)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append((item, pool.apply_async(fn, (item,))))
            if len(pending) >= 2 * workers:
                done = pending.popleft()
                yield done[0], done[1].get()
        while pending:
            done = pending.popleft()
            yield done[0], done[1].get()


def _progress(total: int, enabled: bool):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("[bold]tokenizing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[tokens]:,} tokens"), disable=not enabled, transient=False,
    )


def _encode_all(files: list[sources.InputFile], tok: LoadedTokenizer, writer: ShardWriter, *, field: str,
                workers: int, progress: bool) -> int:
    """Encode every input into ``writer``; returns the number of documents."""
    docs, tokens, in_text_doc = 0, 0, False
    init_args = (tok.tok.to_str(), tok.eos_id, tok.bos_id, field)
    with _progress(sources.total_bytes(files), progress) as bar:
        task = bar.add_task("tokenizing", total=sources.total_bytes(files), tokens=0)
        for unit, (ids, done) in _ordered_map(sources.encode_unit, sources.units(files, field), workers,
                                              sources.init_worker, init_args):
            if unit.kind == "text":  # one document per file: separators around the whole file
                if ids.size and not in_text_doc and tok.bos_id is not None:
                    ids = np.concatenate([np.asarray([tok.bos_id], np.uint32), ids])
                in_text_doc = in_text_doc or bool(ids.size)
                if unit.ends_file and in_text_doc:
                    ids = np.concatenate([ids, np.asarray([tok.eos_id], np.uint32)])
                    done, in_text_doc = 1, False
            writer.write(ids)
            docs, tokens = docs + done, tokens + int(ids.size)
            bar.update(task, advance=unit.num_bytes, tokens=tokens)
    writer.close()
    return docs


def prepare(inputs: list, out: Path, *, vocab_size: int = 0, tokenizer: Path | None = None, shard_tokens: int = 1 << 26,
            field: str = "text", fmt: str = "auto", eos: str | None = None, workers: int = 1, progress: bool = False,
            overwrite: bool = False) -> dict:
    """Write ``out``/tokenizer.json, the shard files and meta.json (last); return the metadata."""
    if (vocab_size > 0) == (tokenizer is not None):
        raise DataError("give exactly one of --vocab-size N (train a byte-level BPE) or --tokenizer DIR_OR_FILE")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens={shard_tokens} must be >= 1")
    files = sources.discover([str(p) for p in inputs], fmt)
    out = Path(out)
    if (out / META_FILE).exists() and not overwrite:
        raise DataError(f"{out / META_FILE} exists: {out} already holds a dataset (pass --overwrite to replace it)")
    tok = load_tokenizer(Path(tokenizer), eos) if tokenizer is not None else None
    if tok is None:
        bpe = train_bpe(sources.iter_texts(files, field), vocab_size)
        tok = LoadedTokenizer(bpe, bpe.token_to_id(EOS), None, f"byte-level BPE trained here, {vocab_size} entries")
    dtype = np.dtype(np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # the old dataset stops being one before its shards change
    for old in out.glob("shard_*.bin"):
        old.unlink()
    tok.tok.save(str(out / "tokenizer.json"))
    writer = ShardWriter(out, dtype, shard_tokens)
    try:
        num_docs = _encode_all(files, tok, writer, field=field, workers=workers, progress=progress)
    except BaseException:  # a refused input or an interrupt: no half-written shards stay behind
        writer.close()
        for shard in writer.shards:
            (out / shard["path"]).unlink(missing_ok=True)
        raise
    num_tokens = sum(s["num_tokens"] for s in writer.shards)
    if num_tokens == 0:
        names = ", ".join(str(f.path) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        raise DataError(f"empty corpus: no text in {len(files)} input file(s) ({names})")
    meta = {
        "format": FORMAT, "version": VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
        "bos_id": tok.bos_id, "num_tokens": num_tokens, "num_documents": num_docs, "shards": writer.shards,
        "tokenizer": "tokenizer.json", "tokenizer_source": tok.source, "model_vocab_size": tok.model_vocab_size,
        "sources": [str(f.path) for f in files],
    }
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / META_FILE)
    return meta


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit code (2 on a user error)."""
    parser = argparse.ArgumentParser(prog="python -m hpframe.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="text, JSON Lines or Parquet files, directories, glob patterns")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--vocab-size", type=int, default=0, help="train a byte-level BPE with this many entries")
    group.add_argument("--tokenizer", type=Path, default=None, help="a Hugging Face model directory or a tokenizer.json")
    parser.add_argument("--field", default="text", help="JSON Lines field / Parquet column holding the text (default text)")
    parser.add_argument("--format", default="auto", choices=sources.FORMATS, help="input format (default: by file name)")
    parser.add_argument("--eos", default=None, help="end-of-sequence token (default: the model directory's)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="encoding processes")
    parser.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard file (default 2^26)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.inputs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                       shard_tokens=args.shard_tokens, field=args.field, fmt=args.format, eos=args.eos,
                       workers=args.workers, progress=not args.no_progress and sys.stderr.isatty(),
                       overwrite=args.overwrite)
    except DataError as err:
        print(f"hpframe.data.prepare: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens in {len(meta['shards'])} shard(s) "
        f"({meta['dtype']}, vocab {meta['vocab_size']}) to {args.out}; train with: data=tokenized "
        f"data.path={args.out} model.vocab_size>={meta['vocab_size']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
