"""The dry-run report: a plan as readable tables (rich) or as one JSON document (see docs/planner.md)."""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any

from hpframe.config.schema import RunConfig
from hpframe.plan.types import ParallelPlan

GIB = 1 << 30


def _num(n: float) -> str:
    for div, unit in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def _gib(n: float) -> str:
    """Bytes in the largest binary unit (up to TiB) that keeps the figure >= 1."""
    for shift, unit in ((40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n:.0f} B"


def _ranks(ranks: list[int]) -> str:
    """'8-15' for consecutive ranks, else the list (shortened with its stride when long)."""
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
    if len(ranks) <= 4:
        return ", ".join(map(str, ranks))
    return f"{ranks[0]}, {ranks[1]}, ..., {ranks[-1]} (stride {ranks[1] - ranks[0]})"


def _seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.3g} s"


def _layers(layers: tuple[int, ...]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def expert_placement(plan: ParallelPlan) -> list[dict[str, Any]]:
    """Per EP rank of the EP group holding rank 0: its experts [first, last], global rank and node."""
    ex = plan.experts
    if ex is None:
        return []
    group = plan.ranks.group("ep", 0)
    out = []
    for ep_rank, rank in enumerate(group):
        ids = ex.local_experts(ep_rank)
        out.append({"ep_rank": ep_rank, "experts": [ids[0], ids[-1]], "rank": rank, "node": plan.ranks.node_of(rank)})
    return out


def dispatch_to_dict(plan: ParallelPlan) -> dict[str, Any] | None:
    """moe.dispatch as resolved: asked, chosen, why, and both options' bytes, seconds and memory."""
    d = plan.dispatch
    if d is None:
        return None
    return {
        "requested": d.requested,
        "chosen": d.chosen,
        "reason": d.reason,
        **{o.mode: {"intra_bytes": o.intra_bytes, "inter_bytes": o.inter_bytes, "calls": o.calls, "seconds": o.seconds,
                    "memory_bytes": o.memory_bytes, "refused": o.refused} for o in (d.tokens, d.experts)},
    }


def plan_to_dict(plan: ParallelPlan, cfg: RunConfig) -> dict[str, Any]:
    """The plan as plain JSON-able data; the keys are documented in docs/planner.md."""
    assert plan.params and plan.memory and plan.comm and plan.time and plan.checkpoint
    mem, comm, ex = plan.memory, plan.comm, plan.experts
    return {
        "recipe": cfg.recipe,
        "model": cfg.model.name,
        "cluster": cfg.cluster.name,
        "world_size": plan.world_size,
        "num_nodes": plan.num_nodes,
        "gpus_per_node": plan.gpus_per_node,
        "degrees": {"tp": plan.tp, "pp": plan.pp, "dp": plan.dp, "ep": plan.ep, "edp": plan.edp, "zero_stage": plan.zero_stage},
        "axis_order": "-".join(plan.ranks.axis_order),
        "batch": {
            "micro_batch_size": plan.micro_batch_size,
            "grad_accum": plan.grad_accum,
            "global_batch_size": plan.global_batch_size,
            "seq_len": plan.seq_len,
            "tokens_per_step": plan.time.tokens_per_step,
        },
        "params": {
            "total": plan.params.total,
            "active": plan.params.active,
            "components": {k: {"total": v, "active": plan.params.active_by_component[k]} for k, v in plan.params.by_component.items()},
        },
        "flops_per_token": plan.flops_per_token,
        "memory_per_gpu_bytes": {
            "stage": mem.stage,
            "weights": mem.weights,
            "gradients": mem.gradients,
            "optimizer": mem.optimizer,
            "activations": mem.activations,
            "total": mem.total,
            "device": mem.device_bytes,
            "params_on_rank": mem.params_on_rank,
            "per_stage_total": list(mem.per_stage_total),
            "fetched_experts": mem.fetched_experts,
            "load_host_peak": mem.load_host_peak,
        },
        "pipeline": {
            "manual": plan.pipeline.manual,
            "stages": [
                {"index": s.index, "layers": list(s.layers), "has_embedding": s.has_embedding, "has_head": s.has_head, "cost": s.cost}
                for s in plan.pipeline.stages
            ],
        },
        "moe_layers": list(plan.moe_layers),
        "experts": None
        if ex is None
        else {
            "num_experts": ex.num_experts,
            "ep": ex.ep,
            "experts_per_rank": ex.experts_per_rank,
            "routing_groups": ex.routing_groups,
            "max_groups_per_token": ex.max_groups_per_token,
            "placement": expert_placement(plan),
            "dispatch": dispatch_to_dict(plan),
        },
        "comm_bytes_per_step": {
            "stage": comm.stage,
            **{k: dict(v) for k, v in comm.parts.items()},
            "total": comm.total,
            "moe_move_experts": dict(comm.moe_move_experts),
            "all_to_all_calls": comm.all_to_all_calls,
            "fetch_calls": comm.fetch_calls,
            "moe_dispatch": None if plan.dispatch is None else {
                o.mode: {"intra": o.intra_bytes, "inter": o.inter_bytes, "calls": o.calls, "seconds": o.seconds}
                for o in (plan.dispatch.tokens, plan.dispatch.experts)
            },
        },
        "time": {
            "assumed_mfu": plan.time.assumed_mfu,
            "compute_seconds": plan.time.compute_seconds,
            "bubble_fraction": plan.time.bubble_fraction,
            "comm_seconds": plan.time.comm_seconds,
            "step_seconds": plan.time.step_seconds,
        },
        "checkpoint": {
            "bytes": plan.checkpoint.bytes,
            "write_seconds": plan.checkpoint.write_seconds,
            "job_mtbf_seconds": plan.checkpoint.job_mtbf_seconds,
            "interval_seconds": plan.checkpoint.interval_seconds,
            "interval_steps": plan.checkpoint.interval_steps,
            "save_timeout_seconds": plan.checkpoint.save_timeout_seconds,
            "memory": dataclasses.asdict(plan.checkpoint.memory) if plan.checkpoint.memory is not None else None,
        },
        "warnings": list(plan.warnings),
    }


def _suggestions(plan: ParallelPlan, cfg: RunConfig) -> list[dict[str, Any]]:
    from dataclasses import asdict

    from hpframe.plan.suggest import suggest_layouts

    return [asdict(s) for s in suggest_layouts(cfg, plan)]


def render_json(plan: ParallelPlan, cfg: RunConfig) -> str:
    """One JSON document (see docs/planner.md for the keys); with plan.suggest, also ``suggestions``."""
    doc = plan_to_dict(plan, cfg)
    if cfg.plan.suggest:
        doc["suggestions"] = _suggestions(plan, cfg)
    return json.dumps(doc, indent=2)


def render_table(plan: ParallelPlan, cfg: RunConfig, width: int = 110) -> str:
    """The plan as plain-text rich tables."""
    from rich.console import Console
    from rich.table import Table

    d = plan_to_dict(plan, cfg)
    buf = io.StringIO()
    con = Console(file=buf, width=width, color_system=None, force_terminal=False, highlight=False)

    def table(title: str, *cols: str) -> Table:
        con.print(f"\n[bold]{title}[/bold]")  # a heading line: a table title would wrap to the table's width
        t = Table(show_edge=False, pad_edge=False)
        for c in cols:
            t.add_column(c, justify="right" if c not in ("", "item", "part", "component", "layers") else "left")
        return t

    deg = d["degrees"]
    t = table(f"{cfg.model.name} on {cfg.cluster.name}: {plan.world_size} GPUs = {plan.num_nodes} nodes x {plan.gpus_per_node}",
              "tp", "pp", "dp", "ep", "edp", "zero", "order", "micro", "accum", "global batch", "seq")
    t.add_row(*(str(deg[k]) for k in ("tp", "pp", "dp", "ep", "edp", "zero_stage")), d["axis_order"], str(plan.micro_batch_size),
              str(plan.grad_accum), str(plan.global_batch_size), str(plan.seq_len))
    con.print(t)

    t = table("Parameters", "component", "total", "active/token")
    for k, v in d["params"]["components"].items():
        if v["total"]:
            t.add_row(k, f"{v['total']:,}", f"{v['active']:,}")
    t.add_row("all", f"{plan.params.total:,} ({_num(plan.params.total)})", f"{plan.params.active:,} ({_num(plan.params.active)})")
    con.print(t)
    con.print(f"\nTraining FLOPs per token: {_num(plan.flops_per_token)} (6 x active matmul params + attention scores);"
              f" per step {_num(plan.flops_per_token * plan.time.tokens_per_step)}")

    mem = d["memory_per_gpu_bytes"]
    t = table("Pipeline stages", "stage", "layers", "blocks", "moe", "extras", "memory/GPU")
    moe = set(plan.moe_layers)
    for s, total in zip(plan.pipeline.stages, plan.memory.per_stage_total):
        extras = ", ".join(x for x, on in (("embedding", s.has_embedding), ("head", s.has_head)) if on)
        t.add_row(str(s.index), _layers(s.layers), str(len(s.layers)), str(sum(1 for i in s.layers if i in moe)), extras, _gib(total))
    con.print(t)

    t = table(f"Memory per GPU, worst rank (stage {mem['stage']}; device {_gib(mem['device'])})", "part", "bytes")
    for k in ("weights", "gradients", "optimizer", "activations", *(("fetched_experts",) if mem["fetched_experts"] else ()), "total"):
        t.add_row(k, _gib(mem[k]))
    if mem["load_host_peak"]:
        t.add_row("host, loading model.from_hf", _gib(mem["load_host_peak"]))
    con.print(t)

    if d["experts"]:
        ex = d["experts"]
        con.print(f"\nExperts: {ex['num_experts']} over ep={ex['ep']} ({ex['experts_per_rank']} per rank), {len(plan.moe_layers)} MoE blocks;"
                  f" routing groups {ex['routing_groups']}, at most {ex['max_groups_per_token'] or 'all'} per token")
        t = table("Expert placement in the EP group of rank 0", "node", "ranks", "ep ranks", "experts")
        by_node: dict[int, list[dict[str, Any]]] = {}
        for row in ex["placement"]:
            by_node.setdefault(row["node"], []).append(row)
        for node, rows in by_node.items():
            t.add_row(str(node), _ranks([r["rank"] for r in rows]), f"{rows[0]['ep_rank']}-{rows[-1]['ep_rank']}",
                      f"{rows[0]['experts'][0]}-{rows[-1]['experts'][1]}")
        con.print(t)

    comm = d["comm_bytes_per_step"]
    t = table(f"Communication per GPU per step (stage {comm['stage']})", "part", "intra-node", "inter-node")
    for k in ("moe_all_to_all", "moe_fetch_experts", "tp", "dp", "pp"):
        t.add_row(k, _gib(comm[k]["intra"]), _gib(comm[k]["inter"]))
    con.print(t)
    if d["experts"] and d["experts"]["dispatch"]:
        dd = d["experts"]["dispatch"]
        t = table(f"MoE dispatch: {dd['chosen']} (moe.dispatch={dd['requested']}; {dd['reason']})",
                  "mode", "intra-node", "inter-node", "calls", "time", "extra memory", "refused")
        for mode in ("tokens", "experts"):
            o = dd[mode]
            t.add_row(mode, _gib(o["intra_bytes"]), _gib(o["inter_bytes"]), str(o["calls"]), _seconds(o["seconds"]),
                      _gib(o["memory_bytes"]), o["refused"] or "-")
        con.print(t)

    tm, ck = d["time"], d["checkpoint"]
    t = table("Time and checkpoints", "item", "value")
    t.add_row("compute per step", f"{_seconds(tm['compute_seconds'])} at MFU {tm['assumed_mfu']:.0%}, bubble {tm['bubble_fraction']:.1%}")
    t.add_row("communication per step", f"{_seconds(tm['comm_seconds'])} (no overlap)")
    t.add_row("step (upper bound)", _seconds(tm["step_seconds"]))
    t.add_row("checkpoint size", _gib(ck["bytes"]))
    t.add_row("checkpoint write", f"{_seconds(ck['write_seconds'])} at {cfg.cluster.storage_bw_GBps:g} GB/s")
    t.add_row("job MTBF", _seconds(ck["job_mtbf_seconds"]))
    t.add_row("checkpoint interval (Young/Daly)", f"{_seconds(ck['interval_seconds'])} = {ck['interval_steps']} steps")
    t.add_row("save timeout (each wait)", _seconds(ck["save_timeout_seconds"]))
    mem = ck["memory"]
    if mem is not None:
        state = "on" if mem["enabled"] else "off (checkpoint.memory_interval=0; figures if on)"
        t.add_row("fast tier (host memory)", f"{state}, {mem['replicas']} replica(s) on peer nodes")
        t.add_row("  snapshot per rank", _gib(mem["snapshot_bytes_per_rank"]))
        t.add_row("  host memory per node", f"{_gib(mem['host_bytes_per_node'])} of {_gib(mem['host_memory_bytes'])} "
                  f"(2 steps, own + replicas{', pinned staging' if cfg.cluster.device.value == 'cuda' else ''})")
        t.add_row("  stall / write / replica transfer", f"{_seconds(mem['snapshot_stall_seconds'])} / "
                  f"{_seconds(mem['write_seconds'])} / {_seconds(mem['replica_seconds'])}")
        t.add_row("  snapshot interval (Young/Daly)", f"{_seconds(mem['interval_seconds'])} = {mem['interval_steps']} steps")
        t.add_row("  lost work per failure", f"{_seconds(mem['lost_work_seconds_with'])} with, "
                  f"{_seconds(mem['lost_work_seconds_without'])} without the fast tier")
    con.print(t)

    if cfg.plan.suggest:
        t = table(f"Suggested layouts for {plan.world_size} GPUs at global batch {plan.global_batch_size} (fastest first)",
                  "tp", "pp", "dp", "ep", "zero", "recompute", "memory/GPU", "step", "compute", "comm")
        for sg in _suggestions(plan, cfg):
            t.add_row(*(str(sg[k]) for k in ("tp", "pp", "dp", "ep", "zero_stage", "recompute")), _gib(sg["memory_bytes"]),
                      _seconds(sg["step_seconds"]), _seconds(sg["compute_seconds"]), _seconds(sg["comm_seconds"]))
        con.print(t)

    if plan.warnings:
        con.print("\n[bold]Warnings[/bold]")
        for w in plan.warnings:
            con.print(f"  - {w}")
    return buf.getvalue().strip()
