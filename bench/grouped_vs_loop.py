"""Expert GEMMs forward + backward on one GPU: torch._grouped_mm against one cuBLAS GEMM per expert.

    python3 bench/grouped_vs_loop.py [--out grouped_vs_loop.json]
    python3 bench/grouped_vs_loop.py --device cpu --tokens 256     # a smoke run of the code paths

For each shape, the three SwiGLU expert GEMMs and their backward (input and weight gradients) on
expert-sorted rows with balanced random routing, bf16, and nothing else: the activation's input is a
fixed random tensor, so elementwise work is not in the figure.
  grouped  hpframe.models.moe_gpu.grouped_linear (torch._grouped_mm, weight gradients in place) as
           hpframe's experts run it: gate and up projections as one GEMM on the packed w13 [E,2F,H],
           then the down projection;
  loop     torch.mm per expert on the contiguous row block of that expert (the split sizes on the
           host), w1, w3 and w2 separately.
Both are checked against each other first (outputs and input gradient); then the median of 10 timed
repetitions and TFLOP/s (18 x N x H x F per MLP, N = rows). On CUDA it needs compute capability 9.0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from hpframe.models.moe_gpu import grouped_linear  # noqa: E402

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


def run(name: str, device: str = "cuda", tokens: int = 0) -> dict:
    t, k, e, h, f = SHAPES[name]
    t = tokens or t
    g = torch.Generator(device=device).manual_seed(0)
    n = t * k
    idx = torch.randint(0, e, (n,), device=device, generator=g)
    counts = torch.bincount(idx, minlength=e)
    splits = counts.tolist()
    offs = torch.cumsum(counts, 0, dtype=torch.int32)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=g) * scale).bfloat16()

    x, act = rand(n, h), rand(n, f)
    w1, w3, w2 = rand(e, f, h, scale=h**-0.5), rand(e, f, h, scale=h**-0.5), rand(e, h, f, scale=f**-0.5)
    w13 = torch.cat([w1, w3], dim=1)  # hpframe's packed layout: gate rows, then up rows
    g1, g3, gy = rand(n, f), rand(n, f), rand(n, h)
    g13 = torch.cat([g1, g3], dim=1)

    def grouped() -> tuple[torch.Tensor, torch.Tensor]:
        xs, a13, ac, a2 = (t_.detach().requires_grad_(True) for t_ in (x, w13, act, w2))
        h13 = grouped_linear(xs, a13, offs)
        y = grouped_linear(ac, a2, offs)
        torch.autograd.backward([h13, y], [g13, gy])
        return y, xs.grad

    def loop() -> tuple[torch.Tensor, torch.Tensor]:
        loop_linear(x, w1, splits), loop_linear(x, w3, splits)
        y = loop_linear(act, w2, splits)
        loop_backward(act, w2, gy, splits)
        gx1, _ = loop_backward(x, w1, g1, splits)
        gx3, _ = loop_backward(x, w3, g3, splits)
        return y, gx1 + gx3

    (y_ref, gx_ref), (y_loop, gx_loop) = grouped(), loop()
    err = max(common.rel_err(y_loop, y_ref), common.rel_err(gx_loop, gx_ref))
    flops = 18 * n * h * f
    out = {"shape": name, "rows": n, "rows_per_expert": n / e, "rel_err": err}
    for label, fn in (("grouped", grouped), ("loop", loop)):
        ms = common.time_cuda(fn, warmup=2, min_reps=10, max_reps=10)["median_ms"]
        out[label] = {"ms": ms, "tflops": flops / ms / 1e9}
    print(f"{name:<13} rows/expert {n / e:7.0f}  grouped {out['grouped']['ms']:7.2f} ms {out['grouped']['tflops']:5.0f} TFLOP/s"
          f"  loop {out['loop']['ms']:7.2f} ms {out['loop']['tflops']:5.0f} TFLOP/s  (y, grad x rel err {err:.1e})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=0, help="tokens per shape (default: the shape's own)")
    args = ap.parse_args()
    rows = [run(s, args.device, args.tokens) for s in SHAPES]
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
