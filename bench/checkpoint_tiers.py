"""Checkpoint tiers on CPU processes: storage saves, memory snapshots, recovery, at 1, 2 and 4 processes.

``python -m bench.checkpoint_tiers [--procs 1 2 4] [--hidden 512] [--gpus-per-node 1] [--out FILE]``:
mixtral_debug (its hidden size widened to ``--hidden``), dp = processes, ZeRO-1, fp32, gloo, simulated
nodes of ``--gpus-per-node`` processes (``cluster.gpus_per_node``) and one replica per snapshot. After
one training step, per rank:
  * storage, synchronous: stall (= wall) of 3 saves; asynchronous: stall of 3 saves (a training step
    after each) and the wall time from the last save until it is committed;
  * host memory of a save: bytes of this rank's captured part, and the growth of the process's peak
    resident memory over the saves;
  * memory tier (memory_interval=1): stall of 3 snapshots, one after each training step (with the
    part of it spent waiting for the previous snapshot), and the time from the last snapshot until it
    is in memory here and at its peer;
  * recovery: the fast tier's find + load against loading the newest storage checkpoint; then, with
    node 1's memory wiped (a lost node), find + load again (from the replicas: ``peer``); for both,
    the bytes this rank received, and the bytes the previous recovery sent each node (every part the
    node lacked, to its lowest rank), from the same holders and part sizes;
and the planner's figures for the same configuration. Medians over the saves; one JSON document.
The machine's 2 cores are shared: figures vary by a factor of 2 between runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
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


def overrides(procs: int, hidden: int, shm: str, gpus_per_node: int = 1) -> list[str]:
    return ["recipe=mixtral_debug", f"model.hidden_size={hidden}", f"parallel.dp={procs}", "parallel.zero_stage=1",
            "parallel.micro_batch_size=1", "parallel.grad_accum=1", "data.seq_len=32", "data.num_synthetic_tokens=50000",
            "train=smoke", f"cluster.nodes={-(-procs // gpus_per_node)}", f"cluster.gpus_per_node={gpus_per_node}", "checkpoint.memory_interval=1",
            f"checkpoint.memory_dir={shm}"]


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(rank: int, world: int, hidden: int, root: str, shm: str, gpus_per_node: int) -> dict[str, Any]:
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

    cfg = _compose(*overrides(world, hidden, shm, gpus_per_node))
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
    out["recover_memory_received_bytes"] = _received(memory)
    out["recover_memory_previous_bytes"] = _previous_bytes(memory, found)
    if memory.num_nodes > 1:  # node 1 loses its memory
        dist.barrier()
        if rank == memory.gpn:
            shutil.rmtree(memory.dir)
        dist.barrier()
        t0 = time.perf_counter()
        found = memory.find()
        # (read before load writes node 1's parts back; the previous recovery sent to a node's lowest rank)
        sizes = _part_bytes(memory, found) if rank % memory.gpn == 0 else {}
        memory.load(found)
        out["recover_lost_node_s"] = time.perf_counter() - t0
        out["recover_lost_node_tier"] = found.tier
        out["recover_lost_node_received_bytes"] = _received(memory)
        out["recover_lost_node_previous_bytes"] = _previous_bytes(memory, found, sizes)
    dist.barrier()
    t0 = time.perf_counter()
    manager.load(engine, manager.resume_point("auto", Path(root) / "sync").path)
    out["recover_storage_s"] = time.perf_counter() - t0
    memory.close(remove=True)
    if rank == 0:
        mem = plan.checkpoint.memory
        out["plan"] = {"checkpoint_bytes": plan.checkpoint.bytes, "write_s": plan.checkpoint.write_seconds,
                       "snapshot_bytes_per_rank": mem.snapshot_bytes_per_rank, "snapshot_stall_s": mem.snapshot_stall_seconds,
                       "host_bytes_per_node": mem.host_bytes_per_node}
    return out


def _received(memory: Any) -> int | None:
    """Bytes recovery sent this rank (None on trees before ``MemoryTier.received``, to time them alike)."""
    received = getattr(memory, "received", None)
    return received.bytes if received is not None else None


def _part_bytes(memory: Any, found: Any) -> dict[int, int]:
    """Bytes of every rank's part as recovery sends it (packed files), read from a node holding it."""
    from hpframe.checkpoint.memory import node_dir, pack_part, step_dir

    return {r: pack_part(step_dir(node_dir(memory.job, nodes[0]), found.step), r).numel()
            for r, nodes in found.holders.items()}


def _previous_bytes(memory: Any, found: Any, sizes: dict[int, int] | None = None) -> int:
    """What the previous recovery sent this rank (non-zero on a node's lowest rank only): every part its
    node lacked, whole."""
    if memory.rank % memory.gpn:
        return 0
    sizes = sizes if sizes is not None else _part_bytes(memory, found)
    return sum(sizes[r] for r, nodes in found.holders.items() if memory.node not in nodes)


def main(argv: list[str] | None = None) -> int:
    from bench.common import environment
    from hpframe.testing.distributed import run_distributed

    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_tiers", description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--gpus-per-node", type=int, default=1, help="processes per simulated node")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shm", default="/dev/shm", help="where the fast tier's node memory goes (a tmpfs)")
    args = parser.parse_args(argv)
    doc: dict[str, Any] = {"environment": environment(), "hidden": args.hidden, "gpus_per_node": args.gpus_per_node, "runs": {}}
    for procs in args.procs:
        with tempfile.TemporaryDirectory(prefix="hpframe-bench-") as root, \
                tempfile.TemporaryDirectory(prefix="hpframe-bench-", dir=args.shm) as shm:
            ranks = run_distributed(_worker, procs, (args.hidden, root, shm, args.gpus_per_node), timeout=900)
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
        mib = 2**20
        for case in ("memory", "lost_node"):
            if f"recover_{case}_received_bytes" not in r0:
                continue
            got = [r[f"recover_{case}_received_bytes"] or 0 for r in ranks]
            before = [r[f"recover_{case}_previous_bytes"] for r in ranks]
            print(f"  recovery ({case}, tier {r0.get(f'recover_{case}_tier', r0['recover_tier'])}, "
                  f"{max(r[f'recover_{case}_s'] for r in ranks):.2f} s): received per rank "
                  f"{[round(b / mib, 1) for b in got]} MiB, {sum(got) / mib:.1f} in all; the previous recovery: "
                  f"{[round(b / mib, 1) for b in before]} MiB, {sum(before) / mib:.1f} in all", flush=True)
    text = json.dumps(doc, indent=1, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
