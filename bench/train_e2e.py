"""End-to-end training throughput on one GPU: hpframe's model vs transformers' Mixtral, same run.

Both train the same architecture (defaults: hidden 2048, 12 layers, 8 experts of 5632, top-2,
16 heads / 4 KV heads, vocab 32000, batch 4 x 4096 tokens) in bf16 with SDPA attention and
``torch.optim.AdamW(fused=True)`` on bf16 parameters (no fp32 master copy), on random tokens.
hpframe's side is ``hpframe.models.build_model`` with a plain step (forward, cross-entropy + aux loss,
backward, optimizer step): the DeepSpeed engine is not in this measurement. ``hpframe_compile`` also
torch.compiles the norms, the attention modules and the loss (MoE layers eager, hpframe's GPU path).

MFU = planner FLOPs per token (``make_plan(cfg).flops_per_token``) x tokens/s / 989 TFLOP/s, and the
same rate over the measured 8192^3 bf16 matmul rate. The planner's memory and step-time estimates
are recorded next to the measured peak memory and step time.

    python bench/train_e2e.py --impls hf_eager hf_grouped_mm hpframe --out train_e2e.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402

DEVICE = "cuda"  # the CPU smoke test of the builders sets "cpu"


def run_config(args: argparse.Namespace) -> Any:
    """The RunConfig of the measured model on one H200 (also what the planner is asked about)."""
    from hpframe.config.schema import (
        Arch, ClusterConfig, DataConfig, DType, ModelConfig, MoEConfig, ParallelConfig, RunConfig, TrainConfig,
    )

    return RunConfig(
        model=ModelConfig(name="mixtral_bench", arch=Arch.mixtral, hidden_size=args.hidden, num_layers=args.layers,
                          num_heads=16, num_kv_heads=4, ffn_hidden_size=args.ffn, vocab_size=32000,
                          max_seq_len=args.seq),
        moe=MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_ffn_hidden_size=args.ffn,
                      dropless=True, aux_loss_coef=0.0),
        parallel=ParallelConfig(micro_batch_size=args.batch, grad_accum=1, zero_stage=0),
        # bf16 weights updated in place, no fp32 master copy: the plain step measured here
        train=TrainConfig(dtype=DType.bf16, master_dtype=DType.bf16, device="cuda", steps=args.steps),
        data=DataConfig(seq_len=args.seq),
        cluster=ClusterConfig(name="h200x1", nodes=1, gpus_per_node=1, gpu_memory_gb=139.0,
                              peak_tflops=common.H200_PEAK_TFLOPS, intra_node_bw_GBps=450.0),
    )


def plan_summary(cfg: Any) -> dict[str, Any]:
    """The planner's view of the run (or the error it raised)."""
    try:
        from hpframe.plan import make_plan

        plan = make_plan(cfg, world_size=1)
    except Exception as exc:  # the planner is an input here, not the thing measured
        return {"error": f"{type(exc).__name__}: {exc}"}
    out: dict[str, Any] = {"flops_per_token": plan.flops_per_token}
    if plan.memory is not None:
        out["memory"] = {f.name: getattr(plan.memory, f.name) for f in dataclasses.fields(plan.memory)}
        out["memory"]["total"] = plan.memory.total
    if plan.time is not None:
        out["time"] = {f.name: getattr(plan.time, f.name) for f in dataclasses.fields(plan.time)}
    if plan.params is not None:
        out["params"] = {f.name: getattr(plan.params, f.name) for f in dataclasses.fields(plan.params)}
    return out


def flops_per_token_formula(args: argparse.Namespace) -> float:
    """6 x active matmul weights + causal-free attention term, for when the planner is unavailable."""
    h, f, l, v, s = args.hidden, args.ffn, args.layers, 32000, args.seq
    kv = h // 16 * 4
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f * args.top_k + h * args.experts
    return 6 * (l * per_layer + v * h) + 3 * l * 2 * 2 * h * s


@torch.no_grad()
def init_on_gpu(model: torch.nn.Module, std: float) -> None:
    """Random init on the GPU (the CPU-generator init of init_weights is slow for billions of weights)."""
    from hpframe.models.layers import RMSNorm, RotaryEmbedding
    from hpframe.models.moe import Router

    for mod in model.modules():
        if isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
        elif isinstance(mod, RotaryEmbedding):
            mod.reset_tables()
        elif isinstance(mod, Router):
            mod.gate.weight.normal_(0.0, std)
            mod.reset_buffers()
    for name, p in model.named_parameters():
        if not name.endswith("norm.weight"):
            p.normal_(0.0, std)


def build_hpframe(cfg: Any, compile_dense: bool) -> tuple[torch.nn.Module, Callable]:
    """hpframe's model; ``compile_dense`` torch.compiles the norms, attention and the loss (the MoE
    layers stay eager: they run hpframe's own fused GPU path)."""
    from hpframe.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe)
    model = model.to_empty(device=DEVICE)
    init_on_gpu(model, cfg.model.init_std)
    model = model.to(torch.bfloat16)

    def ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        v = logits.shape[-1]
        return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), tokens[:, 1:].reshape(-1))

    if compile_dense:
        for block in model.layers:
            for part in (block.attn_norm, block.attn, block.mlp_norm):
                part.compile()
        model.norm.compile()
        ce = torch.compile(ce)

    def loss_fn(tokens: torch.Tensor) -> torch.Tensor:
        return ce(model(tokens), tokens) + model.aux_loss

    return model, loss_fn


def build_hf(args: argparse.Namespace, impl: str) -> tuple[torch.nn.Module, Callable]:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.ffn,
                        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
                        num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                        max_position_embeddings=args.seq, router_jitter_noise=0.0, output_router_logits=False,
                        attn_implementation="sdpa", experts_implementation=impl, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = MixtralForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.use_cache = False
    row_impl = getattr(model.config, "_experts_implementation", None)
    if row_impl != impl:
        raise RuntimeError(f"transformers kept experts_implementation={row_impl!r}, asked for {impl!r}")

    def loss_fn(tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens, labels=tokens, use_cache=False).loss

    return model, loss_fn


def measure(impl: str, args: argparse.Namespace, cfg: Any, fpt: float, ceiling: float) -> dict[str, Any]:
    row: dict[str, Any] = {"impl": impl}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if impl.startswith("hf_"):
        model, loss_fn = build_hf(args, impl.removeprefix("hf_"))
    else:
        model, loss_fn = build_hpframe(cfg, compile_dense=impl == "hpframe_compile")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, 32000, (args.batch, args.seq), device="cuda", generator=g) for _ in range(4)]
    losses: list[float] = []
    i = 0

    def step() -> None:
        nonlocal i
        loss = loss_fn(batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        i += 1
        losses.append(loss.detach())

    t = common.time_cuda(step, warmup=args.warmup, min_reps=args.steps, max_reps=args.steps)
    tokens = args.batch * args.seq
    row.update(t)
    row["params"] = n_params
    row["tokens_per_step"] = tokens
    row["tokens_per_s"] = tokens / (t["median_ms"] * 1e-3)
    row["model_tflops"] = fpt * row["tokens_per_s"] / 1e12
    row["mfu_vs_datasheet"] = row["model_tflops"] / common.H200_PEAK_TFLOPS
    row["mfu_vs_measured_matmul"] = row["model_tflops"] / ceiling
    row["peak_mem_gib"] = common.gib(torch.cuda.max_memory_allocated())
    row["static_gib"] = common.gib(n_params * 2 * 4)  # weights, grads, Adam m, Adam v: 2 bytes each
    row["losses"] = [float(x) for x in losses[:: max(1, len(losses) // 8)]]
    row["loss_finite"] = all(torch.isfinite(x).item() for x in losses)
    print(f"{impl:14s} {t['median_ms']:8.1f} ms/step {row['tokens_per_s'] / 1e3:7.1f}k tok/s "
          f"MFU {row['mfu_vs_datasheet']:.3f} (vs measured matmul {row['mfu_vs_measured_matmul']:.3f}) "
          f"peak {row['peak_mem_gib']:.1f} GiB params {n_params / 1e9:.2f}B loss {row['losses'][-1]:.3f}",
          flush=True)
    if args.profile and impl in args.profile:
        table = common.profile_table(step, steps=1, row_limit=30)
        (common.out_dir() / f"profile_train_{impl}.txt").write_text(table)
    del model, opt, batches, losses
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", nargs="+", default=["hf_eager", "hf_grouped_mm", "hpframe", "hpframe_compile"])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", nargs="*", default=[])
    ap.add_argument("--out", default="train_e2e.json")
    args = ap.parse_args()
    cfg = run_config(args)
    plan = plan_summary(cfg)
    fpt = float(plan.get("flops_per_token") or flops_per_token_formula(args))
    ceiling = common.measure_matmul_tflops()
    print(f"flops/token {fpt:.3e} ({'planner' if 'flops_per_token' in plan else 'formula'}); "
          f"matmul ceiling {ceiling:.0f} TFLOP/s; planner: {plan}", flush=True)
    rows = []
    for impl in args.impls:
        try:
            rows.append(measure(impl, args, cfg, fpt, ceiling))
        except Exception as exc:  # keep the other implementations' numbers
            rows.append({"impl": impl, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
            print(f"{impl}: ERROR {exc}\n{traceback.format_exc()}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        common.write_json(args.out, {"env": common.environment(), "args": vars(args), "flops_per_token": fpt,
                                     "flops_source": "planner" if "flops_per_token" in plan else "formula",
                                     "matmul_ceiling_tflops": ceiling, "planner": plan,
                                     "command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
