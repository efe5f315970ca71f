"""Throughput of ``hpframe.data.prepare`` on a generated JSON Lines corpus, by number of worker processes.

    python bench/prepare_throughput.py [--mb 40] [--workers 1 2] [--out bench/results/local/prepare.json]

The corpus (``--mb`` MB of documents of 50-400 random words from a 5,000-word vocabulary, seeded) and
a byte-level BPE of 8,192 entries trained on 1.3 MB of it are written to a temporary directory; then
``prepare`` runs once per worker count. Prints and writes one JSON document: MB/s and tokens/s per
worker count, with the machine's core count and the library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_corpus(directory: Path, mb: int) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    path = directory / "corpus.jsonl"
    with open(path, "w") as f:
        size = 0
        while size < mb * 1_000_000:
            line = json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(50, 400))) + "."}) + "\n"
            f.write(line)
            size += len(line)
    (directory / "sample.txt").write_text(" ".join(rng.choice(words) for _ in range(200_000)))
    return path


def main() -> int:
    import tokenizers

    from hpframe.data.prepare import prepare

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = make_corpus(root, args.mb)
        prepare([root / "sample.txt"], root / "tok", vocab_size=8192)
        runs = []
        for w in args.workers:
            t0 = time.perf_counter()
            meta = prepare([corpus], root / f"w{w}", tokenizer=root / "tok" / "tokenizer.json", workers=w)
            dt = time.perf_counter() - t0
            runs.append({"workers": w, "seconds": round(dt, 2), "MB_per_s": round(corpus.stat().st_size / 1e6 / dt, 2),
                         "tokens_per_s": round(meta["num_tokens"] / dt), "tokens": meta["num_tokens"],
                         "documents": meta["num_documents"]})
            print(json.dumps(runs[-1]), flush=True)
    doc = {"corpus_MB": args.mb, "cpu_count": os.cpu_count(), "load_average_1_5_15": os.getloadavg(), "python": platform.python_version(),
           "tokenizers": tokenizers.__version__, "runs": runs}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
