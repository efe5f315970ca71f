"""AdamW update on one GPU: torch's fused AdamW against hpframe's Triton kernel (hpframe.engine.adamw_kernel).

    python3 bench/adamw_bench.py [--out adamw.json]

Tensors of the mixtral_h200 model (bench/grad_copy.py's shapes, 3.58 B elements), two layouts:
  plain bf16   bf16 parameters, gradients and moments, one tensor per parameter (train.master_dtype=bf16,
               ZeRO 0): 14 bytes per element per update;
  fp32 master  one flat fp32 tensor each for parameters, gradients and moments (DeepSpeed's
               BF16_Optimizer partitions): 28 bytes per element.
Both optimizers get the guard's device verdict (a clipping coefficient, no skip). After a check that
the two agree over three steps, median ms of 10 CUDA-event timed steps after 2 warm-ups, and the
achieved bandwidth. Needs a CUDA GPU with Triton.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.grad_copy import shapes  # noqa: E402
from hpframe.engine.step import SkippableAdamW  # noqa: E402


def _opt(params: list[torch.Tensor], kernel: bool) -> SkippableAdamW:
    opt = SkippableAdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    if kernel:
        assert opt._use_kernel()  # decided as in training: Triton importable, CUDA tensors
    else:
        opt._kernel = False  # torch's fused AdamW
    return opt


def _step(opt: SkippableAdamW, coef: torch.Tensor, bad: torch.Tensor) -> None:
    opt.control(coef, bad)
    opt.step()
    opt.control(None)


def measure(layout: str) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    if layout == "plain bf16":
        dims = shapes()
        dtype, bytes_per = torch.bfloat16, 14
    else:
        dims = [(sum(torch.Size(s).numel() for s in shapes()),)]
        dtype, bytes_per = torch.float32, 28
    n = sum(torch.Size(s).numel() for s in dims)
    coef = torch.tensor(0.7, device="cuda", dtype=torch.float64)
    bad = torch.zeros(1, device="cuda")
    out = {"layout": layout, "elements": n, "bytes_per_element": bytes_per}
    # agreement on a small copy of the layout's first tensors (the full model twice would not fit with fp32)
    small = [torch.randn(s, device="cuda", generator=g).to(dtype) * 0.02 for s in dims[:6]]
    pa = [t.clone().requires_grad_(True) for t in small]
    pb = [t.clone().requires_grad_(True) for t in small]
    oa, ob = _opt(pa, True), _opt(pb, False)
    for _ in range(3):
        for a, b in zip(pa, pb):
            a.grad = torch.randn(a.shape, device="cuda", generator=g).to(dtype)
            b.grad = a.grad.clone()
        _step(oa, coef, bad)
        _step(ob, coef, bad)
    out["max_rel_diff"] = max(float((a - b).float().norm() / b.float().norm()) for a, b in zip(pa, pb))
    del pa, pb, oa, ob, small
    params = [torch.randn(s, device="cuda", generator=g).to(dtype).requires_grad_(True) for s in dims]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=g).to(dtype)
    for name, kernel in (("torch fused AdamW", False), ("hpframe Triton AdamW", True)):
        opt = _opt(params, kernel)
        ms = common.time_cuda(lambda: _step(opt, coef, bad), warmup=2, min_reps=10, max_reps=10)["median_ms"]
        out[name] = {"ms": ms, "GBps": n * bytes_per / ms / 1e6}
        print(f"{layout:<12} {name:<22} {ms:8.2f} ms  {out[name]['GBps']:8.0f} GB/s", flush=True)
        opt.state.clear()
        del opt
        torch.cuda.empty_cache()
    print(f"{layout:<12} agreement over 3 steps: max relative difference {out['max_rel_diff']:.2e}", flush=True)
    del params
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = [measure("plain bf16"), measure("fp32 master")]
    if args.out:
        common.write_json(args.out, {"env": common.environment(), "command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
