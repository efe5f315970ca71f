"""Turn local text files into hpframe's tokenized-dataset format (offline).

    python -m hpframe.data.prepare INPUT... --out DIR [--vocab-size N | --tokenizer FILE] [--shard-tokens N]

Each input file is one document; documents are separated by the end-of-text token. The tokenizer is
either a byte-level BPE trained on the inputs with ``--vocab-size`` entries, or a local
``tokenizer.json`` (``--tokenizer``). It is saved as DIR/tokenizer.json; token ids go to memory-mapped
shards (uint16 when the vocabulary fits, else uint32) described by DIR/meta.json (see
``hpframe.data.dataset``). Train with ``data=tokenized data.path=DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hpframe.data.dataset import FORMAT, META_FILE, VERSION

EOS = "<|endoftext|>"
LINES_PER_BATCH = 4096


def train_bpe(inputs: list[Path], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` entries (256 bytes + merges + the end-of-text token)."""
    if vocab_size < 257:
        raise ValueError(f"--vocab-size={vocab_size}: a byte-level BPE needs at least 257 entries (256 bytes + {EOS})")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text byte for byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(p) for p in inputs], trainer)
    return tok


def encode_file(tok: Tokenizer, path: Path) -> list[np.ndarray]:
    """Token ids of one file, in chunks of lines (newlines kept, so the chunks decode back to the file)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    chunks = []
    for i in range(0, len(lines), LINES_PER_BATCH):
        for enc in tok.encode_batch(lines[i : i + LINES_PER_BATCH], add_special_tokens=False):
            chunks.append(np.asarray(enc.ids, dtype=np.int64))
    return chunks


def prepare(inputs: list[Path], out: Path, *, vocab_size: int = 0, tokenizer: Path | None = None, shard_tokens: int = 1 << 26) -> dict:
    """Write ``out``/meta.json, tokenizer.json and shard files; return the metadata."""
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise ValueError(f"input files not found: {missing}")
    if (vocab_size > 0) == (tokenizer is not None):
        raise ValueError("give exactly one of --vocab-size N (train a byte-level BPE) or --tokenizer FILE")
    tok = Tokenizer.from_file(str(tokenizer)) if tokenizer is not None else train_bpe(inputs, vocab_size)
    eos_id = tok.token_to_id(EOS)
    if eos_id is None:  # a foreign tokenizer without our separator: append it
        tok.add_special_tokens([EOS])
        eos_id = tok.token_to_id(EOS)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))

    shards: list[dict] = []
    pending: list[np.ndarray] = []
    pending_len = 0

    def flush() -> None:
        nonlocal pending, pending_len
        if not pending_len:
            return
        name = f"shard_{len(shards):05d}.bin"
        np.concatenate(pending).astype(dtype).tofile(out / name)
        shards.append({"path": name, "num_tokens": pending_len})
        pending, pending_len = [], 0

    for path in inputs:
        for ids in encode_file(tok, path) + [np.asarray([eos_id], dtype=np.int64)]:
            while ids.size:
                take = min(ids.size, shard_tokens - pending_len)
                pending.append(ids[:take])
                pending_len += take
                ids = ids[take:]
                if pending_len == shard_tokens:
                    flush()
    flush()
    meta = {
        "format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name, "vocab_size": vocab, "eos_id": eos_id,
        "num_tokens": sum(s["num_tokens"] for s in shards), "shards": shards, "tokenizer": "tokenizer.json",
        "sources": [str(p) for p in inputs],
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit code (2 on a user error)."""
    parser = argparse.ArgumentParser(prog="python -m hpframe.data.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="UTF-8 text files, one document each")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--vocab-size", type=int, default=0, help="train a byte-level BPE with this many entries")
    group.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json instead")
    parser.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard file (default 2^26)")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.inputs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer, shard_tokens=args.shard_tokens)
    except ValueError as err:
        print(f"hpframe.data.prepare: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {meta['num_tokens']:,} tokens in {len(meta['shards'])} shard(s) ({meta['dtype']}, vocab {meta['vocab_size']}) "
        f"to {args.out}; train with: data=tokenized data.path={args.out} model.vocab_size>={meta['vocab_size']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
