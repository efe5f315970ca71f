"""Expert parallelism on 2 GPUs: ep=2 (dp=2) training step vs one GPU, and all-to-all bandwidth.

Launch: ``torchrun --standalone --nproc_per_node 2 bench/ep_bench.py``. Model and batch per GPU are
those of ``bench/train_e2e.py`` (hidden 2048, 12 layers, 8 experts of 5632, top-2, 4 x 4096 tokens).

1. raw ``all_to_all_single`` of equal splits, several sizes: time, and the bytes that leave each GPU
   (the remote half of its buffer for 2 ranks) over that time.
2. the EP exchange on real routing: the row all-to-all of ``hpframe.parallel.expert`` (dispatch and
   the reverse combine) with the uneven splits a random router gives, vs the raw call of the same bytes.
3. step time, each GPU alone (the whole model, no communication) vs ep=2 dp=2 through
   ``hpframe.parallel.parallelize`` (dense gradients averaged over dp by one flat all-reduce,
   expert gradients divided by dp as the EP module's docstring prescribes), fused AdamW in bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench.train_e2e import init_on_gpu, run_config  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a gloo smoke run of the script


def timed(fn: Callable[[], Any], **kw: Any) -> dict[str, Any]:
    dist.barrier()
    return common.time_cuda(fn, **kw)


def raw_all_to_all(sizes_mib: list[int], world: int) -> list[dict[str, Any]]:
    rows = []
    for mib in sizes_mib:
        n = mib * 2**20 // 2
        inp = torch.randn(n, device=DEV, dtype=torch.bfloat16)
        out = torch.empty_like(inp)
        t = timed(lambda: dist.all_to_all_single(out, inp), warmup=5, min_reps=20, max_reps=20)
        remote = inp.numel() * 2 * (world - 1) / world
        rows.append({"buffer_mib": mib, **t, "remote_GBps": remote / (t["median_ms"] * 1e-3) / 1e9})
        del inp, out
    return rows


def ep_exchange(model: torch.nn.Module, args: argparse.Namespace, world: int) -> dict[str, Any]:
    """Time the EP row all-to-all (dispatch, then combine) on the routing of the first MoE layer."""
    from hpframe.parallel.expert import all_to_all_rows

    moe = model.moe_modules()[0]
    ep = moe.experts
    h = args.hidden
    x = torch.randn(args.batch * args.seq, h, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        r = moe.router(x)
    flat_e = r.topk_idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    counts = torch.bincount(flat_e, minlength=args.experts)
    x_sorted = x[order // args.top_k]
    counts_send = counts.reshape(world, -1)
    counts_recv = torch.empty_like(counts_send)
    dist.all_to_all_single(counts_recv, counts_send, group=ep.ep_group)
    in_splits, out_splits = counts_send.sum(1).tolist(), counts_recv.sum(1).tolist()
    rank = dist.get_rank()
    with torch.no_grad():
        t_disp = timed(lambda: all_to_all_rows(x_sorted, out_splits, in_splits, ep.ep_group), warmup=5,
                       min_reps=20, max_reps=20)
        y_recv = torch.randn(sum(out_splits), h, device=DEV, dtype=torch.bfloat16)
        t_comb = timed(lambda: all_to_all_rows(y_recv, in_splits, out_splits, ep.ep_group), warmup=5,
                       min_reps=20, max_reps=20)
        # the same number of bytes through one raw call of equal splits
        n = x_sorted.shape[0] // world * world
        inp, out = x_sorted[:n].contiguous(), torch.empty(n, h, device=DEV, dtype=torch.bfloat16)
        t_raw = timed(lambda: dist.all_to_all_single(out, inp, group=ep.ep_group), warmup=5, min_reps=20,
                      max_reps=20)
    remote_disp = sum(s for i, s in enumerate(in_splits) if i != rank) * h * 2
    remote_comb = sum(s for i, s in enumerate(out_splits) if i != rank) * h * 2
    return {
        "rows_sent_per_rank": in_splits, "rows_received_per_rank": out_splits,
        "dispatch": {**t_disp, "remote_bytes": remote_disp,
                     "remote_GBps": remote_disp / (t_disp["median_ms"] * 1e-3) / 1e9},
        "combine": {**t_comb, "remote_bytes": remote_comb,
                    "remote_GBps": remote_comb / (t_comb["median_ms"] * 1e-3) / 1e9},
        "raw_same_bytes": {**t_raw, "remote_GBps": n * h * 2 * (world - 1) / world / (t_raw["median_ms"] * 1e-3) / 1e9},
    }


def train_step_fn(model: torch.nn.Module, args: argparse.Namespace, dp_group: Any | None, dp: int) -> Callable:
    dense = [p for p in model.parameters() if not getattr(p, "expert_parallel", False)]
    expert = [p for p in model.parameters() if getattr(p, "expert_parallel", False)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    g = torch.Generator(device=DEV).manual_seed(100 + dist.get_rank())
    batches = [torch.randint(0, 32000, (args.batch, args.seq), device=DEV, generator=g) for _ in range(4)]
    i = 0

    def step() -> None:
        nonlocal i
        tokens = batches[i % len(batches)]
        i += 1
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        (loss + model.aux_loss).backward()
        if dp_group is not None:
            grads = [p.grad for p in dense]
            flat = torch.cat([gr.reshape(-1) for gr in grads])
            dist.all_reduce(flat, group=dp_group)
            flat.div_(dp)
            offset = 0
            for gr in grads:
                gr.copy_(flat[offset: offset + gr.numel()].view_as(gr))
                offset += gr.numel()
            for p in expert:
                p.grad.div_(dp)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def build(cfg: Any) -> torch.nn.Module:
    from hpframe.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe)
    model = model.to_empty(device=DEV)
    init_on_gpu(model, cfg.model.init_std)
    return model.to(torch.bfloat16).train()


def main() -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("hidden", 2048), ("ffn", 5632), ("layers", 12), ("experts", 8), ("top-k", 2),
                          ("batch", 4), ("seq", 4096), ("steps", 6)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--a2a-mib", type=int, nargs="+", default=[16, 64, 128, 256, 1024])
    ap.add_argument("--out", default="ep_bench.json")
    args = ap.parse_args()
    from hpframe.parallel.init import init_distributed
    from hpframe.parallel.parallelize import parallelize
    from hpframe.plan import make_plan

    cfg = run_config(args)
    world = int(__import__("os").environ["WORLD_SIZE"])
    cfg.parallel = dataclasses.replace(cfg.parallel, ep=world, dp=world)
    cfg.cluster = dataclasses.replace(cfg.cluster, gpus_per_node=world)
    plan = make_plan(cfg, world_size=world)
    groups = init_distributed(plan)
    rank = dist.get_rank()
    result: dict[str, Any] = {"env": common.environment(), "args": vars(args), "world": world,
                              "command": " ".join(sys.argv)}
    result["raw_all_to_all"] = raw_all_to_all(args.a2a_mib, world)
    if rank == 0:
        for r in result["raw_all_to_all"]:
            print(f"raw all_to_all {r['buffer_mib']:5d} MiB/rank: {r['median_ms']:7.3f} ms, "
                  f"{r['remote_GBps']:6.1f} GB/s leaving each GPU", flush=True)

    model = build(cfg)  # 1 GPU: the whole model on every GPU, no communication
    step = train_step_fn(model, args, None, 1)
    t1 = timed(step, warmup=3, min_reps=args.steps, max_reps=args.steps)
    result["one_gpu"] = {**t1, "peak_mem_gib": common.peak_gib()}
    del model, step
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    model = parallelize(build(cfg), plan, groups)
    result["ep_exchange"] = ep_exchange(model, args, world)
    step = train_step_fn(model, args, groups.dp, plan.dp)
    t2 = timed(step, warmup=3, min_reps=args.steps, max_reps=args.steps)
    result["ep"] = {**t2, "ep": plan.ep, "dp": plan.dp, "peak_mem_gib": common.peak_gib()}
    result["planner"] = {"step_seconds": plan.time.step_seconds if plan.time else None,
                         "comm_seconds": plan.time.comm_seconds if plan.time else None,
                         "memory_total": plan.memory.total if plan.memory else None,
                         "comm_parts": plan.comm.parts if plan.comm else None}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        common.write_json(args.out, {"ranks": gathered})
        tok = args.batch * args.seq
        for rk, res in enumerate(gathered):
            ex = res["ep_exchange"]
            print(f"rank {rk}: 1 GPU {res['one_gpu']['median_ms']:.1f} ms/step ({tok / res['one_gpu']['median_ms'] * 1e3 / 1e3:.1f}k tok/s), "
                  f"ep={res['ep']['ep']} {res['ep']['median_ms']:.1f} ms/step ({tok / res['ep']['median_ms'] * 1e3 / 1e3:.1f}k tok/s per GPU); "
                  f"peak {res['one_gpu']['peak_mem_gib']:.1f} / {res['ep']['peak_mem_gib']:.1f} GiB; "
                  f"dispatch {ex['dispatch']['median_ms']:.3f} ms {ex['dispatch']['remote_GBps']:.0f} GB/s, "
                  f"combine {ex['combine']['median_ms']:.3f} ms {ex['combine']['remote_GBps']:.0f} GB/s, "
                  f"raw same bytes {ex['raw_same_bytes']['median_ms']:.3f} ms {ex['raw_same_bytes']['remote_GBps']:.0f} GB/s",
                  flush=True)
        print(f"planner: {result['planner']}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
