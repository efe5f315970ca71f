"""The fast tier's snapshot stall on one GPU: copies on a side stream vs blocking copies, vs no snapshot.

    PYTHONPATH=. python bench/snapshot_stall.py [--layers 2] [--steps 40] [--interval 5] [--memory-dir DIR] [--out DIR] [--runs none,side,sync]
    PYTHONPATH=. python bench/snapshot_stall.py --tiny --steps 6 --interval 2   # CPU smoke run of the script

Three ``launch.py`` runs of the mixtral_h200 recipe with ``--layers`` blocks (bf16, fp32 master weights
under ZeRO 1, so each snapshot holds 12 bytes per parameter: master weight and two moments):
``none`` (checkpoint.memory_interval=0), ``side`` (snapshot every ``--interval`` steps, copies on a side
stream, the default) and ``sync`` (the same with ``HPFRAME_SYNC_SNAPSHOT=1``: blocking copies on the
training thread). Recorded per run: ``mem_stall_s`` of every snapshot (the training thread's time in
``MemoryTier.snapshot``) and ``capture_s`` (that time less ``mem_wait_s``, the wait for the previous
snapshot's background write: the capture alone), the median step time of steps that follow a snapshot and of the others, and
tokens/s; writes snapshot_stall.json (with commit and versions) and the runs' logs into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


def run(name: str, overrides: list[str], out: Path, env: dict[str, str], interval: int, ckpt_dir: str) -> dict[str, Any]:
    run_dir = out / name
    cmd = [sys.executable, str(REPO / "launch.py"), *overrides, f"hydra.run.dir={run_dir}"]
    if ckpt_dir:  # the final storage save (the size of a snapshot) away from --out
        cmd.append(f"checkpoint.dir={ckpt_dir}/{name}")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, **env))
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "tail": (proc.stdout + proc.stderr)[-2000:]}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = {r["step"]: r for r in rows if "loss" in r and "step_time_s" in r}
    stalls = {r["step"]: r["mem_stall_s"] for r in rows if "mem_stall_s" in r}
    # the capture alone: the stall less the wait for the previous snapshot's background write
    captures = {r["step"]: r["mem_stall_s"] - r.get("mem_wait_s", 0.0) for r in rows if "mem_stall_s" in r}
    warm = [s for s in steps if s > 3]  # compilation and the first buffers' registration come first
    after = [steps[s]["step_time_s"] for s in warm if interval and (s - 1) in stalls]
    other = [steps[s]["step_time_s"] for s in warm if not (interval and (s - 1) in stalls)]
    return {
        "snapshot_stall_s": {str(k): round(v, 4) for k, v in sorted(stalls.items())},
        "stall_median_s_after_first": statistics.median(list(stalls.values())[1:]) if len(stalls) > 1 else None,
        "capture_s": {str(k): round(v, 4) for k, v in sorted(captures.items())},
        "capture_median_s_after_first": statistics.median(list(captures.values())[1:]) if len(captures) > 1 else None,
        "step_s_median_after_snapshot": statistics.median(after) if after else None,
        "step_s_median_other": statistics.median(other) if other else None,
        "tokens_per_s_median": statistics.median(steps[s]["tokens_per_s"] for s in warm) if warm else None,
        "losses": [round(steps[s]["loss"], 6) for s in sorted(steps)],
        "command": " ".join(cmd), "env": env,
    }


def main() -> None:
    from bench.common import environment

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--memory-dir", default="/dev/shm")
    parser.add_argument("--ckpt-dir", default="", help="checkpoint.dir root for the runs' final saves (default: in each run dir)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results/local"))
    parser.add_argument("--tiny", action="store_true", help="mixtral_debug on the CPU: a smoke run of the script")
    parser.add_argument("--runs", default="none,side,sync", help="which of the three runs, comma-separated")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["recipe=mixtral_h200", f"model.num_layers={args.layers}", f"train.steps={args.steps}",
              "train.dtype=bf16", "train.master_dtype=fp32", "parallel.zero_stage=1", "train.progress=false",
              "train.tensorboard=false", "train.eval_interval=0", "checkpoint.enabled=true", "checkpoint.interval=0", "checkpoint.resume=none",
              f"checkpoint.memory_dir={args.memory_dir}"]
    if args.tiny:
        common = ["recipe=mixtral_debug", f"train.steps={args.steps}", "train.progress=false", "train.tensorboard=false",
                  "train.eval_interval=0", "checkpoint.interval=0", "checkpoint.resume=none",
                  f"checkpoint.memory_dir={args.memory_dir}"]
    snap = [f"checkpoint.memory_interval={args.interval}"]
    runs = {
        "none": lambda: run("none", [*common, "checkpoint.memory_interval=0"], out, {}, 0, args.ckpt_dir),
        "side": lambda: run("side", [*common, *snap], out, {}, args.interval, args.ckpt_dir),
        "sync": lambda: run("sync", [*common, *snap], out, {"HPFRAME_SYNC_SNAPSHOT": "1"}, args.interval, args.ckpt_dir),
    }
    chosen = args.runs.split(",")
    if unknown := sorted(set(chosen) - set(runs)):
        parser.error(f"--runs: unknown {unknown}; choose from {sorted(runs)}")
    results: dict[str, Any] = {name: runs[name]() for name in chosen}
    results["environment"] = environment()
    (out / "snapshot_stall.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk not in ("losses", "command")}
                      for k, v in results.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
