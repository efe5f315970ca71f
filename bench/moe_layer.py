"""MoE layer forward+backward on one GPU: hpframe vs transformers, DeepSpeed, a per-expert loop, roofline.

For each shape (bf16, T tokens): build one random weight set, check every implementation's output
and input gradient against the per-expert loop computed in fp32 from the same bf16 weights, then
time forward+backward (CUDA events, warm-up, median) and record peak memory. FLOPs counted are the
expert matmuls only (18*T*k*H*F); the router is the same small term for every implementation.

    python bench/moe_layer.py --shapes mixtral dsv2lite dsv3 --impls all --out moe_layer.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere, no install needed

from bench import common  # noqa: E402
from bench.moe_impls import (  # noqa: E402
    SHAPES, DenseSwiGLU, LoopMoE, Shape, Weights, build_deepspeed, build_hf, build_hpframe, build_hpframe_fast,
    init_deepspeed_single, roofline_gemm_step,
)

# hpframe_fast (hpframe.models.moe.moe_forward called directly) equals hpframe now that MoE.forward takes that
# path on CUDA; it stays selectable by name.
ALL_IMPLS = ["roofline_gemm", "dense_swiglu", "hpframe", "hf_grouped_mm", "hf_eager", "deepspeed", "loop"]


def build(impl: str, w: Weights, shape: Shape) -> torch.nn.Module:
    if impl == "loop":
        return LoopMoE(w, shape.top_k)
    if impl == "hpframe":
        return build_hpframe(w, shape)
    if impl == "hpframe_fast":
        return build_hpframe_fast(w, shape)
    if impl in ("hf_eager", "hf_grouped_mm"):
        return build_hf(w, shape, impl.removeprefix("hf_"))
    if impl == "deepspeed":
        return build_deepspeed(w, shape)
    if impl == "dense_swiglu":
        return DenseSwiGLU(w, shape.top_k)
    raise ValueError(f"unknown implementation {impl!r}; known: {ALL_IMPLS + ['hpframe_fast']}")


def check(mod: torch.nn.Module, ref: torch.nn.Module, num_tokens: int, hidden: int, seed: int) -> dict[str, Any]:
    """Output and input-gradient agreement with the fp32 loop on fresh random data."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(num_tokens, hidden, device="cuda", generator=g, dtype=torch.float32)
    gy = torch.randn(num_tokens, hidden, device="cuda", generator=g, dtype=torch.float32)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    y = mod(xb)
    y.backward(gy.to(torch.bfloat16))
    xr = xb.detach().float().requires_grad_(True)  # the same bf16-rounded input, in fp32
    yr = ref(xr)
    yr.backward(gy)
    out = {
        "y_rel_err": common.rel_err(y, yr),
        "y_rows_within_3e-2": common.row_agreement(y, yr, 3e-2),
        "dx_rel_err": common.rel_err(xb.grad, xr.grad),
        "dx_rows_within_5e-2": common.row_agreement(xb.grad, xr.grad, 5e-2),
        "y_all_finite": bool(torch.isfinite(y).all()),
    }
    out["ok"] = out["y_all_finite"] and out["y_rows_within_3e-2"] >= 0.9 and out["dx_rows_within_5e-2"] >= 0.9
    mod.zero_grad(set_to_none=True)
    return out


def fwd_bwd(mod: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for p in mod.parameters():
            p.grad = None
        x.grad = None
        mod(x).backward(gy)

    return step


def run_shape(shape: Shape, impls: list[str], num_tokens: int, profile: set[str], budget_s: float) -> list[dict]:
    rows = []
    w = Weights.random(shape, "cuda", torch.bfloat16, seed=0)
    flops = shape.flops(num_tokens)
    ref = None
    if any(i not in ("roofline_gemm", "dense_swiglu") for i in impls):
        ref = LoopMoE(w, shape.top_k, reference=True)  # fp32 compute from the same bf16 weights
    for impl in impls:
        row: dict[str, Any] = {"shape": shape.name, "impl": impl, "tokens": num_tokens, "flops": flops}
        if impl == "deepspeed" and shape.top_k > 2:
            row["skipped"] = f"DeepSpeed gating supports top-1/top-2 only (top_k={shape.top_k})"
            rows.append(row)
            print(f"{shape.name:9s} {impl:14s} skipped: {row['skipped']}", flush=True)
            continue
        mod = step = x = gy = None
        try:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            if impl == "roofline_gemm":
                step = roofline_gemm_step(w, shape, num_tokens)
            else:
                mod = build(impl, w, shape)
                if impl != "dense_swiglu":
                    row["check"] = check(mod, ref, min(num_tokens, 4096), shape.hidden, seed=17)
                x = torch.randn(num_tokens, shape.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                gy = torch.randn(num_tokens, shape.hidden, device="cuda", dtype=torch.bfloat16)
                step = fwd_bwd(mod, x, gy)
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = common.time_cuda(step, budget_s=budget_s)
            row.update(t)
            row["tflops"] = flops / (t["median_ms"] * 1e-3) / 1e12
            row["peak_mem_gib"] = common.gib(torch.cuda.max_memory_allocated())
            row["peak_mem_over_start_gib"] = common.gib(torch.cuda.max_memory_allocated() - base)
            if impl in profile:
                table = common.profile_table(step)
                (common.out_dir() / f"profile_{shape.name}_{impl}.txt").write_text(table)
                row["profile_file"] = f"profile_{shape.name}_{impl}.txt"
            chk = row.get("check", {})
            print(f"{shape.name:9s} {impl:14s} {t['median_ms']:9.2f} ms {row['tflops']:7.1f} TFLOP/s "
                  f"peak {row['peak_mem_gib']:6.1f} GiB  check {chk.get('ok', '-')} "
                  f"(y rows {chk.get('y_rows_within_3e-2', float('nan')):.3f}, "
                  f"dx rows {chk.get('dx_rows_within_5e-2', float('nan')):.3f})", flush=True)
        except Exception as exc:  # one failing implementation must not lose the others' numbers
            row["error"] = f"{type(exc).__name__}: {exc}"
            row["traceback"] = traceback.format_exc()
            print(f"{shape.name:9s} {impl:14s} ERROR {row['error']}", flush=True)
            print(row["traceback"], flush=True)
        rows.append(row)
        del mod, step, x, gy  # the step closure holds the module: drop both before the next build
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--impls", nargs="+", default=["all"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--profile", nargs="*", default=[], help="implementations to profile with torch.profiler")
    ap.add_argument("--budget-s", type=float, default=1.5, help="timing budget per implementation and shape")
    ap.add_argument("--out", default="moe_layer.json")
    args = ap.parse_args()
    impls = ALL_IMPLS if args.impls == ["all"] else args.impls
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference stays fp32
    env = common.environment()
    if "deepspeed" in impls:
        try:
            init_deepspeed_single()
        except Exception as exc:  # deepspeed missing on the machine: the others still run
            print(f"deepspeed unavailable: {type(exc).__name__}: {exc}", flush=True)
            impls = [i for i in impls if i != "deepspeed"]
    ceilings = {"matmul_8192_tflops": common.measure_matmul_tflops(), "copy_gbps": common.measure_copy_gbps()}
    print(f"ceilings: {ceilings}", flush=True)
    rows: list[dict] = []
    for name in args.shapes:
        rows += run_shape(SHAPES[name], impls, args.tokens, set(args.profile), args.budget_s)
        common.write_json(args.out, {"env": env, "ceilings": ceilings, "command": " ".join(sys.argv), "rows": rows})
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    roof = {r["shape"]: r["tflops"] for r in rows if r["impl"] == "roofline_gemm" and "tflops" in r}
    print(f"\n{'shape':9s} {'impl':14s} {'ms':>9s} {'TFLOP/s':>8s} {'x roof':>7s} {'peak GiB':>9s} check")
    for r in rows:
        if "tflops" not in r:
            print(f"{r['shape']:9s} {r['impl']:14s} {r.get('skipped') or r.get('error', '')[:80]}")
            continue
        ratio = r["tflops"] / roof[r["shape"]] if r["shape"] in roof else float("nan")
        print(f"{r['shape']:9s} {r['impl']:14s} {r['median_ms']:9.2f} {r['tflops']:8.1f} {ratio:7.3f} "
              f"{r['peak_mem_gib']:9.1f} {r.get('check', {}).get('ok', '-')}")


if __name__ == "__main__":
    main()
