"""The six expert GEMMs of a SwiGLU MoE layer: torch._grouped_mm (CUTLASS) against inductor's autotuned choice.

    python3 bench/grouped_autotune.py [--shapes mixtral_h200,dsv3] [--out grouped_autotune.json]
    python3 bench/grouped_autotune.py --device cpu --tokens 64 --no-compile    # a smoke run of the code paths

hpframe's experts run six grouped GEMMs per layer and step (`hpframe.models.moe_gpu._GroupedLinear`):
for the packed gate/up weight w13 [E,2F,H] and for w2 [E,H,F], the forward x @ w^T, the input gradient
gy @ w and the weight gradient gy^T x (the groups split the reduction dimension). Each form is timed
as hpframe issues it (eager `torch._grouped_mm`, torch's CUTLASS kernels on sm90) and compiled by
`torch.compile(mode="max-autotune-no-cudagraphs")`, where inductor benchmarks torch's kernel against
its Triton grouped-GEMM templates and keeps the fastest (its AUTOTUNE tables go to stderr). Both are
checked against each other before timing. Routing is random top-k over the experts (near-balanced
but ragged groups, as a trained router with load balancing gives); torch's kernel is also timed on
perfectly balanced groups (every expert exactly N/E rows, a multiple of 128) to show what the
raggedness costs. Each figure is the median of 20 repetitions of 10 back-to-back calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

SHAPES = {  # name: (tokens, top_k, experts, hidden, expert inner)
    "mixtral_h200": (16384, 2, 8, 2048, 5632),
    "dsv2lite": (8192, 6, 64, 2048, 1408),
    "dsv3": (8192, 8, 256, 7168, 2048),
}


def forms(x, act, g13, gy, w13, w2):
    """name -> (function of (a, b, offs), a, b): the GEMMs exactly as _GroupedLinear issues them."""
    return {
        "w13_forward": (lambda a, b, o: torch._grouped_mm(a, b.transpose(-2, -1), offs=o), x, w13),
        "w13_grad_input": (lambda a, b, o: torch._grouped_mm(a, b, offs=o), g13, w13),
        "w13_grad_weight": (lambda a, b, o: torch._grouped_mm(a.transpose(-2, -1), b, offs=o), g13, x),
        "w2_forward": (lambda a, b, o: torch._grouped_mm(a, b.transpose(-2, -1), offs=o), act, w2),
        "w2_grad_input": (lambda a, b, o: torch._grouped_mm(a, b, offs=o), gy, w2),
        "w2_grad_weight": (lambda a, b, o: torch._grouped_mm(a.transpose(-2, -1), b, offs=o), gy, act),
    }


def run(name: str, device: str, tokens: int, compile_: bool, out: dict) -> dict:
    t, k, e, h, f = SHAPES[name]
    t = tokens or t
    n = t * k
    g = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # random top-k routing: each token picks k distinct experts
    idx = torch.rand(t, e, device=device, generator=g).topk(k, dim=-1).indices.reshape(-1)
    counts = torch.bincount(idx, minlength=e)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    offs_balanced = torch.arange(1, e + 1, device=device, dtype=torch.int32) * (n // e)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dtype)

    x, act, g13, gy = rand(n, h), rand(n, f), rand(n, 2 * f), rand(n, h)
    w13, w2 = rand(e, 2 * f, h, scale=h**-0.5), rand(e, h, f, scale=f**-0.5)
    out.update(shape=name, rows=n, experts=e, rows_per_expert_max=int(counts.max()),
               rows_per_expert_min=int(counts.min()), forms={})
    total = {"eager": 0.0, "eager_balanced": 0.0, "autotuned": 0.0}

    def timed(fn, *args) -> float:
        return common.time_cuda(lambda: fn(*args), warmup=3, min_reps=20, max_reps=20, inner=10)["median_ms"]

    for form, (fn, a, b) in forms(x, act, g13, gy, w13, w2).items():
        flops = 2 * n * h * (2 * f if form.startswith("w13") else f)
        ref = fn(a, b, offs)
        row = {"gflop": flops / 1e9}
        eager_ms, balanced_ms = timed(fn, a, b, offs), timed(fn, a, b, offs_balanced)
        row.update(eager_ms=eager_ms, eager_tflops=flops / eager_ms / 1e9,
                   eager_balanced_ms=balanced_ms, eager_balanced_tflops=flops / balanced_ms / 1e9)
        total["eager"] += eager_ms
        total["eager_balanced"] += balanced_ms
        line = (f"{name:<13} {form:<16} {flops / 1e12:6.3f} TFLOP  torch {eager_ms:7.3f} ms {row['eager_tflops']:4.0f} TFLOP/s"
                f"  (balanced groups {balanced_ms:7.3f} ms {row['eager_balanced_tflops']:4.0f})")
        if compile_:
            cfn = torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)
            t0 = time.perf_counter()
            got = cfn(a, b, offs)
            torch.cuda.synchronize()
            row["compile_s"] = time.perf_counter() - t0
            row["rel_err"] = common.rel_err(got, ref)
            del got
            ms = timed(cfn, a, b, offs)
            row.update(autotuned_ms=ms, autotuned_tflops=flops / ms / 1e9, speedup=eager_ms / ms)
            total["autotuned"] += ms
            line += (f"  autotuned {ms:7.3f} ms {row['autotuned_tflops']:4.0f} TFLOP/s x{row['speedup']:.3f}"
                     f"  err {row['rel_err']:.1e}  compile {row['compile_s']:.0f} s")
        del ref
        if device == "cuda":
            torch.cuda.empty_cache()
        out["forms"][form] = row
        print(line, flush=True)
    out["total_ms"] = total
    print(f"{name:<13} all six: torch {total['eager']:.3f} ms (balanced groups {total['eager_balanced']:.3f} ms)"
          + (f", autotuned {total['autotuned']:.3f} ms" if compile_ else ""), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--out", default="")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=0, help="tokens per shape (default: the shape's own)")
    ap.add_argument("--compile-shapes", default=",".join(SHAPES),
                    help="shapes that also get the autotuned compile (each form costs 10-30 s of autotuning)")
    ap.add_argument("--no-compile", action="store_true", help="eager only (the CPU smoke run)")
    args = ap.parse_args()
    rows: list[dict] = []
    try:
        for s in args.shapes.split(","):
            rows.append({})
            run(s, args.device, args.tokens, not args.no_compile and s in args.compile_shapes.split(","), rows[-1])
            if args.out:  # after every shape, so a run cut short keeps what it measured
                common.write_json(args.out, {"env": common.environment(), "command": " ".join(sys.argv), "rows": rows})
    except Exception as exc:  # keep the forms measured before the failure, then fail
        if args.out:
            common.write_json(args.out, {"command": " ".join(sys.argv), "rows": rows, "error": repr(exc)[:2000]})
        raise


if __name__ == "__main__":
    main()
