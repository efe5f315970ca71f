"""Checkpoint tiers on CPU processes: storage saves, memory snapshots, recovery, at 1, 2 and 4 processes.

``python -m bench.checkpoint_tiers [--procs 1 2 4] [--hidden 512] [--out FILE]``: mixtral_debug (its
hidden size widened to ``--hidden``), dp = processes, ZeRO-1, fp32, gloo, one simulated node per
process (``cluster.gpus_per_node=1``) and one replica per snapshot. After one training step, per rank:
  * storage, synchronous: stall (= wall) of 3 saves; asynchronous: stall of 3 saves (a training step
    after each) and the wall time from the last save until it is committed;
  * host memory of a save: bytes of this rank's captured part, and the growth of the process's peak
    resident memory over the saves;
  * memory tier (memory_interval=1): stall of 3 snapshots, one after each training step (with the
    part of it spent waiting for the previous snapshot), and the time from the last snapshot until it
    is in memory here and at its peer;
  * recovery: the fast tier's find + load against loading the newest storage checkpoint;
and the planner's figures for the same configuration. Medians over the saves; one JSON document.
The machine's 2 cores are shared: figures vary by a factor of 2 between runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _compose(*overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    from hpframe.config.convert import to_run_config
    from hpframe.config.store import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=list(overrides)))


def overrides(procs: int, hidden: int, shm: str) -> list[str]:
    return ["recipe=mixtral_debug", f"model.hidden_size={hidden}", f"parallel.dp={procs}", "parallel.zero_stage=1",
            "parallel.micro_batch_size=1", "parallel.grad_accum=1", "data.seq_len=32", "data.num_synthetic_tokens=50000",
            "train=smoke", f"cluster.nodes={procs}", "cluster.gpus_per_node=1", "checkpoint.memory_interval=1",
            f"checkpoint.memory_dir={shm}"]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(rank: int, world: int, hidden: int, root: str, shm: str) -> dict[str, Any]:
    import torch.distributed as dist

    from hpframe.checkpoint import manager, reshard
    from hpframe.checkpoint.async_save import Checkpointer
    from hpframe.checkpoint.memory import MemoryTier
    from hpframe.data import build_data
    from hpframe.engine import build_engine
    from hpframe.engine.ds_env import prepare_deepspeed
    from hpframe.models import build_model
    from hpframe.parallel import init_distributed, parallelize
    from hpframe.plan import make_plan
    from hpframe.train.loop import as_pairs

    cfg = _compose(*overrides(world, hidden, shm))
    prepare_deepspeed()
    plan = make_plan(cfg, world)
    groups = init_distributed(plan)
    model = build_model(cfg.model, cfg.moe)
    model.init_weights(0)
    engine = build_engine(parallelize(model, plan, groups), plan, groups, cfg)
    data = build_data(cfg, plan, rank)
    engine.train_step(as_pairs(data.train.next_step()))
    out: dict[str, Any] = {"rank": rank}
    part = reshard.capture(engine)
    out["part_bytes"] = sum(p.tensor.numel() * p.tensor.element_size() for p in part.pieces)
    del part
    peak0 = _peak_mib()
    sync = Checkpointer(engine, Path(root) / "sync")
    out["sync_stall_s"] = statistics.median(sync.save(s, {"step": s}).stall_s for s in (1, 2, 3))
    out["peak_growth_mib"] = _peak_mib() - peak0
    ckpt = Checkpointer(engine, Path(root) / "async", async_save=True)
    stalls, waits = [], []
    for s in (1, 2, 3):  # a training step between saves, as in a run
        t0 = time.perf_counter()
        stats = ckpt.save(s, {"step": s})
        stalls.append(stats.stall_s)
        waits.append(stats.waited_s)
        engine.train_step(as_pairs(data.train.next_step()))
    ckpt.close()
    out["async_stall_s"], out["async_wall_s"] = statistics.median(stalls), time.perf_counter() - t0
    out["async_waited_s"] = statistics.median(waits)
    memory = MemoryTier(engine, memory_dir=shm, ckpt_root=Path(root) / "sync", replicas=1, fingerprint="bench",
                        timeout_s=600)
    stalls, waits = [], []
    for s in (4, 5, 6):  # memory_interval=1: a snapshot after every step
        engine.train_step(as_pairs(data.train.next_step()))
        state = {"step": s, "consumed_tokens": 0, "data": data.train.state_dict()}
        t0 = time.perf_counter()
        stats = memory.snapshot(s, state)[0]
        stalls.append(stats.stall_s)
        waits.append(stats.waited_s)
    memory.wait()
    out["snapshot_stall_s"], out["snapshot_wall_s"] = statistics.median(stalls), time.perf_counter() - t0
    out["snapshot_waited_s"] = statistics.median(waits)
    dist.barrier()
    t0 = time.perf_counter()
    found = memory.find()
    memory.load(found)
    out["recover_memory_s"] = time.perf_counter() - t0
    out["recover_tier"] = found.tier
    dist.barrier()
    t0 = time.perf_counter()
    manager.load(engine, manager.find_latest(Path(root) / "sync"))
    out["recover_storage_s"] = time.perf_counter() - t0
    memory.close(remove=True)
    if rank == 0:
        mem = plan.checkpoint.memory
        out["plan"] = {"checkpoint_bytes": plan.checkpoint.bytes, "write_s": plan.checkpoint.write_seconds,
                       "snapshot_bytes_per_rank": mem.snapshot_bytes_per_rank, "snapshot_stall_s": mem.snapshot_stall_seconds,
                       "host_bytes_per_node": mem.host_bytes_per_node}
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.common import environment
    from hpframe.testing.distributed import run_distributed

    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_tiers", description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shm", default="/dev/shm", help="where the fast tier's node memory goes (a tmpfs)")
    args = parser.parse_args(argv)
    doc: dict[str, Any] = {"environment": environment(), "hidden": args.hidden, "runs": {}}
    for procs in args.procs:
        with tempfile.TemporaryDirectory(prefix="hpframe-bench-") as root, \
                tempfile.TemporaryDirectory(prefix="hpframe-bench-", dir=args.shm) as shm:
            ranks = run_distributed(_worker, procs, (args.hidden, root, shm), timeout=900)
        doc["runs"][procs] = ranks
        r0 = ranks[0]
        print(f"{procs} proc: part/rank {max(r['part_bytes'] for r in ranks) / 2**20:.1f} MiB, "
              f"sync stall {max(r['sync_stall_s'] for r in ranks):.3f} s, async stall {max(r['async_stall_s'] for r in ranks):.3f} s "
              f"(waiting for the previous {max(r['async_waited_s'] for r in ranks):.3f} s, wall {max(r['async_wall_s'] for r in ranks):.2f} s), "
              f"snapshot stall {max(r['snapshot_stall_s'] for r in ranks):.3f} s (waiting {max(r['snapshot_waited_s'] for r in ranks):.3f} s, "
              f"wall {max(r['snapshot_wall_s'] for r in ranks):.2f} s), peak growth {max(r['peak_growth_mib'] for r in ranks):.0f} MiB, "
              f"recover memory {max(r['recover_memory_s'] for r in ranks):.2f} s ({r0['recover_tier']}) vs storage "
              f"{max(r['recover_storage_s'] for r in ranks):.2f} s; plan: snapshot/rank {r0['plan']['snapshot_bytes_per_rank'] / 2**20:.1f} MiB",
              flush=True)
    text = json.dumps(doc, indent=1, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
