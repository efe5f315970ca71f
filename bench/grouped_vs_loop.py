"""Expert GEMMs forward + backward on one GPU: torch._grouped_mm against one cuBLAS GEMM per expert.

    python3 bench/grouped_vs_loop.py [--out grouped_vs_loop.json]

For each shape, the three SwiGLU expert GEMMs (h1 = x w1^T, h3 = x w3^T, y = a w2^T) and their backward
(input and weight gradients) on expert-sorted rows with balanced random routing, bf16:
  grouped  hpframe.models.moe_gpu.grouped_linear (torch._grouped_mm, weight gradients in place) on the
           packed gate|up weight w13 as hpframe's experts hold it (one GEMM for h1 and h3);
  loop     torch.mm per expert on the contiguous row block of that expert (the split sizes on the host).
Both are checked against each other first; then the median of 10 CUDA-event timed repetitions and
TFLOP/s (18 x N x H x F per MLP, N = rows). Needs a CUDA GPU with compute capability 9.0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from hpframe.models.moe_gpu import grouped_linear, packed_swiglu  # noqa: E402

SHAPES = {  # name: (tokens, top_k, experts, hidden, expert inner)
    "mixtral_h200": (16384, 2, 8, 2048, 5632),
    "mixtral": (8192, 2, 8, 4096, 14336),
    "dsv2lite": (8192, 6, 64, 2048, 1408),
}


def loop_linear(x: torch.Tensor, w: torch.Tensor, splits: list[int]) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(splits):
        if n:
            torch.mm(x[start:start + n], w[e].t(), out=out[start:start + n])
        start += n
    return out


def loop_backward(x: torch.Tensor, w: torch.Tensor, gy: torch.Tensor, splits: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    gx, gw = torch.empty_like(x), torch.empty_like(w)
    start = 0
    for e, n in enumerate(splits):
        if n:
            torch.mm(gy[start:start + n], w[e], out=gx[start:start + n])
            torch.mm(gy[start:start + n].t(), x[start:start + n], out=gw[e])
        else:
            gw[e].zero_()
        start += n
    return gx, gw


def run(name: str) -> dict:
    t, k, e, h, f = SHAPES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    n = t * k
    idx = torch.randint(0, e, (n,), device="cuda", generator=g)
    counts = torch.bincount(idx, minlength=e)
    splits = counts.tolist()
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    w1, w3 = ((torch.randn(e, f, h, device="cuda", generator=g) * h**-0.5).bfloat16() for _ in range(2))
    w2 = (torch.randn(e, h, f, device="cuda", generator=g) * f**-0.5).bfloat16()
    gy = torch.randn(n, h, device="cuda", generator=g).bfloat16()

    w13 = torch.cat([w1, w3], dim=1)  # hpframe's packed layout: gate rows, then up rows

    def grouped() -> torch.Tensor:
        xs, a13, a2 = (t_.detach().requires_grad_(True) for t_ in (x, w13, w2))
        h = grouped_linear(xs, a13, offs)
        act = packed_swiglu(h)  # hpframe's fused kernel (torch ops on the two strided halves are slower)
        y = grouped_linear(act, a2, offs)
        y.backward(gy)
        return y

    def loop() -> torch.Tensor:
        h1, h3 = loop_linear(x, w1, splits), loop_linear(x, w3, splits)
        act = torch.nn.functional.silu(h1) * h3
        y = loop_linear(act, w2, splits)
        gact, _ = loop_backward(act, w2, gy, splits)
        s = torch.sigmoid(h1)
        gh3 = gact * h1 * s
        gh1 = gact * h3 * s * (1 + h1 * (1 - s))
        gx1, _ = loop_backward(x, w1, gh1, splits)
        gx3, _ = loop_backward(x, w3, gh3, splits)
        return y, gx1 + gx3

    y_ref = grouped()
    y_loop, _ = loop()
    err = float((y_loop.float() - y_ref.float()).norm() / y_ref.float().norm())
    flops = 18 * n * h * f
    out = {"shape": name, "rows": n, "rows_per_expert": n / e, "rel_err": err}
    for label, fn in (("grouped", grouped), ("loop", loop)):
        ms = common.time_cuda(fn, warmup=2, min_reps=10, max_reps=10)["median_ms"]
        out[label] = {"ms": ms, "tflops": flops / ms / 1e9}
    print(f"{name:<13} rows/expert {n / e:7.0f}  grouped {out['grouped']['ms']:7.2f} ms {out['grouped']['tflops']:5.0f} TFLOP/s"
          f"  loop {out['loop']['ms']:7.2f} ms {out['loop']['tflops']:5.0f} TFLOP/s  (y rel err {err:.1e})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = [run(s) for s in SHAPES]
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
