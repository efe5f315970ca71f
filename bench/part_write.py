"""The fast tier's background work per snapshot: writing a rank's part into node memory, and packing it
for a peer, as ``MemoryTier`` does it now and as it did before.

    PYTHONPATH=. python bench/part_write.py [--gib 1.0] [--dir /dev/shm] [--reps 3] [--out DIR]

A part of ``--gib`` GiB of fp32 pieces (64 MiB each, random values) is written into ``--dir`` by
``memory.write_own_part`` (safetensors' ``save_file``: the file is written from the host buffers)
and packed for a replica by ``memory.pack_part`` (each file read into the send buffer), against the
previous path: the file's bytes built in memory by safetensors' ``save`` (then written, then copied
into the send buffer). Median seconds of ``--reps`` repetitions, and GiB/s; the two files are checked
to hold equal tensors and metadata. Writes part_write.json (environment, commit, versions) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment  # noqa: E402
from hpframe.checkpoint.memory import commit_file, pack_part, write_files, write_own_part  # noqa: E402
from hpframe.checkpoint.portable import _METADATA, Piece, RankPart, layout_doc, layout_file, tensor_file  # noqa: E402


def make_part(gib: float) -> RankPart:
    n = 16 * 2**20  # 64 MiB of fp32 per piece
    count = max(1, round(gib * 2**30 / (4 * n)))
    g = torch.Generator().manual_seed(0)
    return RankPart(rank=0, pieces=[Piece(f"w{i}", "param", torch.randn(n, generator=g), (n,)) for i in range(count)])


def old_write(directory: Path, part: RankPart) -> torch.Tensor:
    """The previous path: safetensors bytes built in memory, written, then copied into the send buffer."""
    from safetensors.torch import save

    files = {tensor_file(0): save({p.key: p.tensor.contiguous() for p in part.pieces}, metadata=_METADATA),
             layout_file(0): json.dumps(layout_doc(part), sort_keys=True).encode()}
    write_files(directory, 0, 1, "bench", files)
    blob = torch.empty(sum(len(v) for v in files.values()), dtype=torch.uint8)
    view, pos = memoryview(blob.numpy()), 0
    for v in files.values():
        view[pos:pos + len(v)] = v
        pos += len(v)
    return blob


def new_write(directory: Path, part: RankPart) -> torch.Tensor:
    write_own_part(directory, part, {}, {}, 1, "bench")
    return pack_part(directory, 0)


def _same_tensors(a: Path, b: Path) -> bool:
    """Equal tensors and metadata (the headers may list the metadata keys in another order)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        meta = fa.metadata() == fb.metadata()
    return meta and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/local")
    args = ap.parse_args()
    part = make_part(args.gib)
    size = sum(p.tensor.numel() * 4 for p in part.pieces) / 2**30
    root = Path(tempfile.mkdtemp(prefix="hpframe-part-write-", dir=args.dir))
    times: dict[str, list[float]] = {"before: save() bytes, write, copy": [], "now: save_file, read into send buffer": []}
    try:
        for _ in range(args.reps):
            for (name, fn), sub in zip(zip(times, (old_write, new_write)), ("old", "new")):
                d = root / sub
                shutil.rmtree(d, ignore_errors=True)
                t0 = time.perf_counter()
                fn(d, part)
                times[name].append(time.perf_counter() - t0)
        same = _same_tensors(root / "old" / tensor_file(0), root / "new" / tensor_file(0))
        assert json.loads((root / "new" / commit_file(0)).read_text())["files"][tensor_file(0)] > 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {"part_gib": round(size, 3), "dir": args.dir, "reps": args.reps, "tensor_files_equal": same,
              "median_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
              "gib_per_s": {k: round(size / statistics.median(v), 2) for k, v in times.items()},
              "environment": environment()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "part_write.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "environment"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
