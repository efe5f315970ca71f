"""moe.dispatch: the planner's pick between moving tokens and moving experts, and the bytes really sent.

``python bench/dispatch_bench.py [--out DIR]`` (CPU only; about a minute on 2 cores):

1. planner grid (pure, no processes): a Mixtral-like MoE (hidden 4096, 32 blocks, 64 experts) on
   H200 nodes of 8 GPUs (conf/cluster/h200x64.yaml's links), ep = every GPU, for expert sizes
   (expert_ffn_hidden_size), tokens per GPU per micro-batch, top-k and nodes: what ``moe.dispatch=auto``
   picks, both modes' predicted bytes per GPU per step (intra-/inter-node) and MoE communication time,
   and the fetched-weight memory that experts mode adds.
2. measured on CPU processes: 4 gloo processes as 2 simulated nodes of 2 (dp=4, ep=4), a 2-block
   Mixtral-like model (hidden 128, 8 experts), one forward/backward of one micro-batch per mode: the
   bytes each rank sent (experts: ``CommCounter`` in the fetch collectives; tokens: the rows of the
   dispatch and combine all-to-alls, forward and backward, to other ranks), against the planner's
   prediction for the same run (tokens assume uniform routing; the router here is random).
   Also the share of each layer's experts that a rank's tokens selected: what fetching only the
   selected experts would save. Step times on CPU processes say nothing about GPUs and are not reported.

Writes ``dispatch.json`` and ``dispatch.md`` (the tables docs/planner.md quotes) with the commit and
library versions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GRID_EXPERT_FFN = (512, 1408, 4096, 14336)
GRID_TOKENS = (4096, 32768)
GRID_TOP_K = (2, 8)
GRID_NODES = (1, 2, 8)
CPU_GRID = [(ffn, seq, k) for ffn in (32, 256) for seq in (32, 512) for k in (1, 4)]


def compose(*overrides: str) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hpframe.config.convert import to_run_config
    from hpframe.config.store import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(hydra_compose("config", overrides=list(overrides)))


def planner_row(ffn: int, tokens: int, top_k: int, nodes: int) -> dict[str, Any]:
    from hpframe.plan import make_plan

    world = 8 * nodes
    cfg = compose("recipe=mixtral_8x7b", "cluster=h200x64", f"cluster.nodes={nodes}", "parallel.tp=1", "parallel.pp=1",
                  f"parallel.dp={world}", f"parallel.ep={world}", "parallel.micro_batch_size=1", "parallel.grad_accum=1",
                  f"parallel.global_batch_size={world}", f"data.seq_len={tokens}", f"model.max_seq_len={tokens}",
                  "moe.num_experts=64", f"moe.top_k={top_k}", f"moe.expert_ffn_hidden_size={ffn}",
                  "moe.dispatch=auto", "plan.memory_check=false")
    plan = make_plan(cfg)
    d = plan.dispatch
    assert d is not None and plan.memory is not None
    return {"expert_ffn": ffn, "tokens_per_gpu": tokens, "top_k": top_k, "nodes": nodes, "ep": world,
            "pick": d.chosen, "reason": d.reason,
            **{f"{o.mode}_{k}": v for o in (d.tokens, d.experts)
               for k, v in (("intra", o.intra_bytes), ("inter", o.inter_bytes), ("seconds", o.seconds))},
            "experts_memory": d.experts.memory_bytes, "memory_device": plan.memory.device_bytes}


def _tokens_bytes(mod: Any, node_of_ep: list[int], me: int, row_bytes: int) -> dict[str, int]:
    """Bytes this rank sent in one forward/backward of token dispatch: dispatch and combine forward,
    and their reverse exchanges in backward, each row to another EP rank counted once per exchange."""
    sent, recv = mod.stats["rows_sent_per_rank"].tolist(), mod.stats["rows_received_per_rank"].tolist()
    out = {"intra": 0, "inter": 0}
    for p, (s, r) in enumerate(zip(sent, recv)):
        if p == me:
            continue
        link = "inter" if node_of_ep[p] != node_of_ep[me] else "intra"
        out[link] += 2 * (s + r) * row_bytes  # dispatch fwd + combine bwd send s; combine fwd + dispatch bwd send r
    return out


def _measure(rank: int, world: int, rows: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    import torch

    from hpframe.models import build_model
    from hpframe.parallel import build_groups, parallelize
    from hpframe.parallel.expert import ExpertParallelExperts
    from hpframe.parallel.expert_fetch import ExpertFetchExperts
    from hpframe.plan import make_plan
    from hpframe.plan.fetch import fetch_bytes

    out = []
    for ffn, seq, k in rows:
        res: dict[str, Any] = {"expert_ffn": ffn, "tokens_per_gpu": seq, "top_k": k}
        for mode in ("tokens", "experts"):
            cfg = compose("recipe=mixtral_debug", "cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.dp=4",
                          "parallel.ep=4", "parallel.micro_batch_size=1", "parallel.grad_accum=1", f"data.seq_len={seq}",
                          "model.num_layers=2", f"moe.expert_ffn_hidden_size={ffn}", f"moe.top_k={k}",
                          f"moe.dispatch={mode}")
            plan = make_plan(cfg)
            groups = build_groups(plan)
            model = build_model(cfg.model, cfg.moe, routing_groups=plan.experts.routing_groups)
            model.init_weights(cfg.train.seed)
            parallelize(model, plan, groups)
            tokens = torch.randint(0, cfg.model.vocab_size, (1, seq), generator=torch.Generator().manual_seed(rank))
            (model(tokens).square().mean() + model.aux_loss).backward()
            mods = [m.experts for m in model.moe_modules()]
            if mode == "experts":
                assert all(isinstance(m, ExpertFetchExperts) for m in mods)
                c = mods[0].fetch_groups.counter
                measured = {"intra": c.intra, "inter": c.inter}
                # the share of each layer's experts this rank's tokens selected (what a selective fetch would move)
                res["selected_fraction"] = min(float((m.stats["tokens_per_expert"] > 0).float().mean())
                                               for m in model.moe_modules())
            else:
                assert all(isinstance(m, ExpertParallelExperts) for m in mods)
                node_of_ep = [plan.ranks.node_of(r) for r in groups.ranks["ep"]]
                measured = {"intra": 0, "inter": 0}
                for m in mods:
                    part = _tokens_bytes(m, node_of_ep, groups.ep_rank, cfg.model.hidden_size * 4)
                    measured = {key: measured[key] + part[key] for key in measured}
            predicted = fetch_bytes(cfg, plan, plan.pipeline.stages[0]) if mode == "experts" \
                else dict(plan.comm.parts["moe_all_to_all"])
            res[mode] = {"measured": measured, "predicted": predicted}
        auto = make_plan(compose("recipe=mixtral_debug", "cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.dp=4",
                                 "parallel.ep=4", "parallel.micro_batch_size=1", "parallel.grad_accum=1",
                                 f"data.seq_len={seq}", "model.num_layers=2", f"moe.expert_ffn_hidden_size={ffn}",
                                 f"moe.top_k={k}", "moe.dispatch=auto"))
        res["pick"] = auto.dispatch.chosen if auto.dispatch else "tokens"
        out.append(res)
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _pick(r: dict[str, Any]) -> str:
    if "do not fit" in r["reason"]:
        return "tokens (experts faster, fetched weights do not fit)"
    return r["pick"]


def markdown(grid: list[dict[str, Any]], cpu: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [f"# moe.dispatch benchmark (commit {env.get('git_commit')}, torch {env.get('torch')}, "
             f"deepspeed {env.get('deepspeed')}, {env.get('time_utc')})", "",
             "## Planner: Mixtral-like, hidden 4096, 32 MoE blocks, 64 experts, ep = all GPUs, 8 H200 per node",
             "1 micro-batch per step, bf16. Bytes per GPU per step in GiB (intra / inter node); MoE communication time "
             "per step in ms (no overlap); the memory experts mode adds (fetched weights kept for backward) in GiB, "
             "against 139 GiB per GPU.", "",
             "| expert ffn | tokens/GPU | top-k | nodes | auto picks | tokens GiB | tokens ms | experts GiB | experts ms | experts mem GiB |",
             "|---:|---:|---:|---:|:---|---:|---:|---:|---:|---:|"]
    for r in grid:
        lines.append(f"| {r['expert_ffn']} | {r['tokens_per_gpu']} | {r['top_k']} | {r['nodes']} | {_pick(r)} | "
                     f"{_gib(r['tokens_intra'])} / {_gib(r['tokens_inter'])} | {r['tokens_seconds'] * 1e3:.1f} | "
                     f"{_gib(r['experts_intra'])} / {_gib(r['experts_inter'])} | {r['experts_seconds'] * 1e3:.1f} | "
                     f"{r['experts_memory'] / 2**30:.2f} |")
    lines += ["", "## Measured on 4 CPU processes (2 simulated nodes x 2, dp=4, ep=4), one forward/backward",
              "Mixtral-like, hidden 128, 2 MoE blocks, 8 experts, fp32. Bytes per rank (rank 0 / max over ranks), "
              "intra + inter node, measured vs predicted.", "",
              "| expert ffn | tokens/GPU | top-k | auto pick | tokens measured | tokens predicted | experts measured (all ranks) | experts predicted | experts selected (min over layers, rank 0) |",
              "|---:|---:|---:|:---|---:|---:|---:|---:|---:|"]
    for r in cpu:
        tm = [x["tokens"]["measured"] for x in r["ranks"]]
        em = {tuple(x["experts"]["measured"].values()) for x in r["ranks"]}
        tp, ep_ = r["ranks"][0]["tokens"]["predicted"], r["ranks"][0]["experts"]["predicted"]
        lines.append(f"| {r['expert_ffn']} | {r['tokens_per_gpu']} | {r['top_k']} | {r['pick']} | "
                     f"{tm[0]['intra'] + tm[0]['inter']} / {max(t['intra'] + t['inter'] for t in tm)} | "
                     f"{tp['intra'] + tp['inter']} | {' '.join(f'{a}+{b}' for a, b in sorted(em))} | "
                     f"{ep_['intra']}+{ep_['inter']} | {r['selected_fraction']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from bench.common import environment
    from hpframe.testing.distributed import run_distributed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dispatch"))
    args = ap.parse_args()
    grid = [planner_row(f, t, k, n) for f in GRID_EXPERT_FFN for t in GRID_TOKENS for k in GRID_TOP_K for n in GRID_NODES]
    per_rank = run_distributed(_measure, 4, (CPU_GRID,), timeout=600)
    cpu = [{**{k: v for k, v in rows[0].items() if k not in ("tokens", "experts")},
            "ranks": [{"rank": r, "tokens": rows_r[i]["tokens"], "experts": rows_r[i]["experts"]}
                      for r, rows_r in enumerate(per_rank)]}
           for i, rows in enumerate(zip(*per_rank))]
    env = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dispatch.json").write_text(json.dumps({"environment": env, "planner": grid, "cpu_measured": cpu}, indent=1) + "\n")
    (out / "dispatch.md").write_text(markdown(grid, cpu, env))
    print(markdown(grid, cpu, env))


if __name__ == "__main__":
    main()
