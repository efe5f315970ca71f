"""Launch parameters of hpframe's memory-bound Triton kernels, swept on one GPU.

    python3 bench/kernel_sweep.py [--out kernel_sweep.json]

On the tensors of the mixtral_h200 model in bf16 (3.58 B elements, bench/grad_copy.py's shapes with each
expert layer's w1 and w3 packed into one w13, as the model holds them):
  adamw    hpframe.engine.adamw_kernel._adamw_kernel (14 bytes per element) for elements per program x
           warps per program;
  sq_sum   the gradient norm's sum of squares (2 bytes per element) for elements per partial sum.
Median ms of 10 CUDA-event timed repetitions after 2 warm-ups and the achieved bandwidth, against a
device-to-device copy of 2 GiB measured in the same run. Needs a CUDA GPU with Triton.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.grad_copy import shapes  # noqa: E402
from hpframe.engine import adamw_kernel as ak  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    # the model's experts hold w1 and w3 packed as one w13 [E, 2F, H]
    sh = [s for s in shapes()]
    packed = []
    for s in sh:
        if len(s) == 3 and packed and packed[-1] == s and s[1] > s[2]:
            packed[-1] = (s[0], 2 * s[1], s[2])
        else:
            packed.append(s)
    ps = [torch.randn(s, device="cuda", generator=g).bfloat16() for s in packed]
    gs = [torch.randn_like(p) for p in ps]
    ms_, vs = [torch.randn_like(p) for p in ps], [torch.rand_like(p) for p in ps]
    step = torch.ones((), device="cuda")
    coef, bad = torch.ones((), device="cuda"), torch.zeros(1, device="cuda")
    n = sum(p.numel() for p in ps)
    copy_gbps = common.measure_copy_gbps()
    rows = []
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            def adamw() -> None:
                for p, gr, m, v in zip(ps, gs, ms_, vs):
                    ak._adamw_kernel[(triton.cdiv(p.numel(), block),)](
                        p, gr, m, v, p, step, coef, bad, p.numel(), 1e-6, 0.9, 0.95, 1e-8, 0.0, HAS_LP=False,
                        BLOCK=block, num_warps=warps)
            t = common.time_cuda(adamw, warmup=2, min_reps=10, max_reps=10)["median_ms"]
            rows.append({"kernel": "adamw", "block": block, "warps": warps, "ms": t, "gbps": 14 * n / t / 1e6})
            print(f"adamw  block {block:5d} warps {warps:2d}: {t:7.3f} ms {14 * n / t / 1e6:7.0f} GB/s", flush=True)
    for block in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16):
            def sq() -> None:
                sizes = [triton.cdiv(p.numel(), block) for p in gs]
                out = torch.empty(sum(sizes), dtype=torch.float32, device="cuda")
                start = 0
                for p, k in zip(gs, sizes):
                    ak._sq_sum_kernel[(k,)](p, out[start:start + k], p.numel(), BLOCK=block, num_warps=warps)
                    start += k
                out.sum(dtype=torch.float64)
            t = common.time_cuda(sq, warmup=2, min_reps=10, max_reps=10)["median_ms"]
            rows.append({"kernel": "sq_sum", "block": block, "warps": warps, "ms": t, "gbps": 2 * n / t / 1e6})
            print(f"sq_sum block {block:5d} warps {warps:2d}: {t:7.3f} ms {2 * n / t / 1e6:7.0f} GB/s", flush=True)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "command": " ".join(sys.argv), "elements": n,
                                     "copy_gbps": copy_gbps, "rows": rows})


if __name__ == "__main__":
    main()
