"""Where the MoE layer's wall time goes beyond its kernels: host syncs and launch overhead.

For each shape and implementation: (1) one forward+backward under ``torch.cuda.set_sync_debug_mode``
("warn"), listing the source lines that synchronized with the host; (2) host time to issue the
forward and the backward (no synchronization in between); (3) the step timed as in moe_layer.py
(queue drained before each step) and "queued" (the step enqueued behind ~50 ms of matmuls, so
host launch time is hidden and only device time remains, unless the step itself syncs).

    python bench/moe_diag.py --shapes mixtral dsv2lite dsv3 --impls roofline_gemm hpframe hf_grouped_mm
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.moe_impls import SHAPES, Weights, roofline_gemm_step  # noqa: E402
from bench.moe_layer import build, fwd_bwd  # noqa: E402


def queued_ms(step: Callable[[], None], reps: int = 10) -> float:
    """Median device time of ``step`` enqueued behind a long matmul chain (host launches hidden)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        for _ in range(80):  # ~0.6 ms each: the queue stays ahead of the host
            a @ a
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def syncs(step: Callable[[], None]) -> list[str]:
    """Source lines that synchronized with the host during one step."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sorted({f"{Path(w.filename).name}:{w.lineno}: {str(w.message)[:80]}" for w in caught})


def host_ms(mod: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor) -> dict[str, float]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    y = mod(x)
    t1 = time.perf_counter()
    y.backward(gy)
    t2 = time.perf_counter()
    torch.cuda.synchronize()
    return {"host_forward_ms": (t1 - t0) * 1e3, "host_backward_ms": (t2 - t1) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--impls", nargs="+", default=["roofline_gemm", "hpframe", "hf_grouped_mm"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", default="moe_diag.json")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    for name in args.shapes:
        shape = SHAPES[name]
        w = Weights.random(shape, "cuda", torch.bfloat16, seed=0)
        for impl in args.impls:
            row: dict[str, Any] = {"shape": name, "impl": impl}
            if impl == "roofline_gemm":
                mod, step = None, roofline_gemm_step(w, shape, args.tokens)
            else:
                mod = build(impl, w, shape)
                x = torch.randn(args.tokens, shape.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                gy = torch.randn(args.tokens, shape.hidden, device="cuda", dtype=torch.bfloat16)
                step = fwd_bwd(mod, x, gy)
            for _ in range(3):
                step()
            row["drained"] = common.time_cuda(step, warmup=1, min_reps=10, max_reps=10)["median_ms"]
            row["queued"] = queued_ms(step)
            if mod is not None:
                row["syncs"] = syncs(step)
                row.update(host_ms(mod, x, gy))
            rows.append(row)
            print(f"{name:9s} {impl:14s} drained {row['drained']:7.2f} ms  queued {row['queued']:7.2f} ms  "
                  f"host fwd {row.get('host_forward_ms', 0):6.2f} bwd {row.get('host_backward_ms', 0):6.2f} ms  "
                  f"syncs {row.get('syncs', [])}", flush=True)
            del mod, step
            torch.cuda.empty_cache()
        del w
        common.write_json(args.out, {"env": common.environment(), "rows": rows})


if __name__ == "__main__":
    main()
