"""bf16 -> fp32 gradient hand-over kernels on one GPU: per-tensor vs multi-tensor (foreach) copy and add.

    python3 bench/grad_copy.py [--out results.json]

The tensors mimic the mixtral_h200 model of docs/performance.md (embedding, head, 12 blocks of attention
and 8 stacked experts of 5632 x 2048): 3.58 B elements. For each variant: median ms of 10 CUDA-event
timed repetitions after 2 warm-ups (bench/common.py), and the achieved bandwidth (bytes read + written
/ time). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402


def shapes() -> list[tuple[int, ...]]:
    h, f, e, v, kv = 2048, 5632, 8, 32000, 512
    out: list[tuple[int, ...]] = [(v, h), (v, h)]
    for _ in range(12):
        out += [(h, h), (kv, h), (kv, h), (h, h), (h,), (h,), (e, h), (e, f, h), (e, f, h), (e, h, f)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    lp = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes()]
    hp = [torch.empty(s, device="cuda", dtype=torch.float32) for s in shapes()]
    n = sum(t.numel() for t in lp)
    # correctness first
    torch._foreach_copy_(hp, lp)
    assert all(torch.equal(a, b.float()) for a, b in zip(hp, lp))
    torch._foreach_add_(hp, lp)
    assert all(torch.equal(a, 2 * b.float()) for a, b in zip(hp, lp))
    variants = {
        "copy per tensor (hp.copy_(lp))": (lambda: [a.copy_(b) for a, b in zip(hp, lp)], 6),
        "copy foreach (_foreach_copy_)": (lambda: torch._foreach_copy_(hp, lp), 6),
        "add per tensor (hp.add_(lp.to(fp32)))": (lambda: [a.add_(b.to(torch.float32)) for a, b in zip(hp, lp)], 18),
        "add per tensor (hp.add_(lp))": (lambda: [a.add_(b) for a, b in zip(hp, lp)], 10),
        "add foreach (_foreach_add_)": (lambda: torch._foreach_add_(hp, lp), 10),
        "fp32 -> bf16 per tensor (lp.copy_(hp))": (lambda: [b.copy_(a) for a, b in zip(hp, lp)], 6),
    }
    rows = {}
    for name, (fn, bytes_per) in variants.items():
        ms = common.time_cuda(fn, warmup=2, min_reps=10, max_reps=10)["median_ms"]
        rows[name] = {"ms": ms, "GBps": n * bytes_per / ms / 1e6}
        print(f"{name:<42} {ms:8.2f} ms  {rows[name]['GBps']:8.0f} GB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"elements": n, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
