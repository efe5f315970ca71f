"""Kernel choices for the dense parts of mixtral_h200's step, forward + backward, side by side.

    python3 bench/kernel_choices.py [--out kernel_choices.json]

1. Attention (4 x 4096 tokens, 16 query heads / 4 KV heads of 128, causal, bf16) through
   ``F.scaled_dot_product_attention`` with each backend torch offers on the GPU: flash, cuDNN and
   memory-efficient, with ``enable_gqa`` and with the KV heads expanded; eager and compiled.
   The output and the three input gradients of every backend are compared with the flash backend's.
2. The SwiGLU expert input GEMMs: h1 = x w1^T and h3 = x w3^T as two grouped GEMMs against one
   grouped GEMM on [w1; w3] stacked per expert (what a fused w13 parameter would give).
3. The attention projections: q, k, v as three GEMMs against one GEMM on the stacked weights.

Median of CUDA-event timed repetitions (bench/common.py), TFLOP/s of the useful work (causal
attention counts half the score matrix). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from hpframe.models.moe_gpu import grouped_linear  # noqa: E402

B, S, NH, NKV, HD = 4, 4096, 16, 4, 128
HIDDEN, FFN, EXPERTS, TOP_K = 2048, 5632, 8, 2


def _rand(*shape: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda", generator=g) * scale).bfloat16()


def attention(compiled: bool) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = _rand(B, NH, S, HD, g=g), _rand(B, NKV, S, HD, g=g), _rand(B, NKV, S, HD, g=g)
    go = _rand(B, NH, S, HD, g=g)
    flops = 4 * B * NH * S * S * HD / 2 * 3.5  # causal: half the scores; backward = 2.5 x forward

    def make(backend: SDPBackend, expand: bool):
        def attn(q_, k_, v_):
            with sdpa_kernel([backend]):
                if expand:
                    k_, v_ = k_.repeat_interleave(NH // NKV, 1), v_.repeat_interleave(NH // NKV, 1)
                    return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True)
                return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)

        fn = torch.compile(attn, fullgraph=True) if compiled else attn

        def step():
            qs, ks, vs = (t.detach().requires_grad_(True) for t in (q, k, v))
            o = fn(qs, ks, vs)
            o.backward(go)
            return o, qs.grad, ks.grad, vs.grad
        return step

    ref = None
    rows = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        for expand in (False, True):
            name = f"{backend.name.lower()}{'_expand' if expand else '_gqa'}{'_compiled' if compiled else ''}"
            step = make(backend, expand)
            try:
                out = step()
            except Exception as e:  # a backend that refuses these inputs is reported, not fatal
                print(f"{name:<40} not available: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                rows.append({"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                continue
            if ref is None:
                ref = [t.float() for t in out]
            errs = [common.rel_err(a.float(), r) for a, r in zip(out, ref)]
            t = common.time_cuda(step, warmup=3, min_reps=10, max_reps=20)
            rows.append({"name": name, "ms": t["median_ms"], "tflops": flops / t["median_ms"] / 1e9,
                         "rel_err_vs_flash": errs, "timing": t})
            print(f"{name:<40} {t['median_ms']:7.3f} ms {flops / t['median_ms'] / 1e9:6.0f} TFLOP/s"
                  f"  err o/dq/dk/dv {' '.join(f'{e:.1e}' for e in errs)}", flush=True)
    return rows


def expert_input_gemms() -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(1)
    n = B * S * TOP_K
    idx = torch.randint(0, EXPERTS, (n,), device="cuda", generator=g)
    offs = torch.cumsum(torch.bincount(idx, minlength=EXPERTS), 0, dtype=torch.int32)
    x = _rand(n, HIDDEN, g=g)
    w1, w3 = _rand(EXPERTS, FFN, HIDDEN, g=g, scale=HIDDEN**-0.5), _rand(EXPERTS, FFN, HIDDEN, g=g, scale=HIDDEN**-0.5)
    w13 = torch.cat([w1, w3], dim=1).contiguous()
    g1, g3 = _rand(n, FFN, g=g), _rand(n, FFN, g=g)
    g13 = torch.cat([g1, g3], dim=1)
    flops = 12 * n * HIDDEN * FFN

    def separate():
        xs, a1, a3 = (t.detach().requires_grad_(True) for t in (x, w1, w3))
        h1, h3 = grouped_linear(xs, a1, offs), grouped_linear(xs, a3, offs)
        torch.autograd.backward([h1, h3], [g1, g3])
        return torch.cat([h1, h3], 1), xs.grad

    def fused():
        xs, a13 = x.detach().requires_grad_(True), w13.detach().requires_grad_(True)
        h13 = grouped_linear(xs, a13, offs)
        h13.backward(g13)
        return h13, xs.grad

    (hs, gs), (hf, gf) = separate(), fused()
    rows = []
    for name, fn in (("w1_w3_separate", separate), ("w13_fused", fused)):
        t = common.time_cuda(fn, warmup=3, min_reps=10, max_reps=20)
        rows.append({"name": name, "ms": t["median_ms"], "tflops": flops / t["median_ms"] / 1e9, "timing": t})
        print(f"{name:<40} {t['median_ms']:7.3f} ms {flops / t['median_ms'] / 1e9:6.0f} TFLOP/s", flush=True)
    rows.append({"rel_err_h": common.rel_err(hf.float(), hs.float()), "rel_err_gx": common.rel_err(gf.float(), gs.float())})
    return rows


def qkv_gemms() -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(2)
    x = _rand(B * S, HIDDEN, g=g)
    wq, wk, wv = (_rand(o, HIDDEN, g=g, scale=HIDDEN**-0.5) for o in (NH * HD, NKV * HD, NKV * HD))
    wqkv = torch.cat([wq, wk, wv]).contiguous()
    gq, gk, gv = _rand(B * S, NH * HD, g=g), _rand(B * S, NKV * HD, g=g), _rand(B * S, NKV * HD, g=g)
    gqkv = torch.cat([gq, gk, gv], 1)
    flops = 6 * B * S * HIDDEN * wqkv.shape[0]

    def separate():
        xs, a, b, c = (t.detach().requires_grad_(True) for t in (x, wq, wk, wv))
        torch.autograd.backward([F.linear(xs, a), F.linear(xs, b), F.linear(xs, c)], [gq, gk, gv])
        return xs.grad

    def fused():
        xs, w = x.detach().requires_grad_(True), wqkv.detach().requires_grad_(True)
        F.linear(xs, w).backward(gqkv)
        return xs.grad

    rows = []
    for name, fn in (("qkv_separate", separate), ("qkv_fused", fused)):
        t = common.time_cuda(fn, warmup=3, min_reps=10, max_reps=20)
        rows.append({"name": name, "ms": t["median_ms"], "tflops": flops / t["median_ms"] / 1e9, "timing": t})
        print(f"{name:<40} {t['median_ms']:7.3f} ms {flops / t['median_ms'] / 1e9:6.0f} TFLOP/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    result = {"env": common.environment(), "command": " ".join(sys.argv),
              "attention_eager": attention(False), "attention_compiled": attention(True),
              "expert_input_gemms": expert_input_gemms(), "qkv": qkv_gemms()}
    if args.out:
        common.write_json(args.out, result)


if __name__ == "__main__":
    main()
