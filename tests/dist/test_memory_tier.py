"""The fast tier (checkpoint.memory_interval): resume from host memory, a peer's replica, or storage.

One launch of 2 CPU processes (gloo), deepseek_debug at dp2 = ep2 with ZeRO-1 and aux-loss-free router
biases, ``cluster.gpus_per_node=1``: two simulated nodes, each with its own memory directory (standing
for its /dev/shm). Snapshots every step (replicated to the other node), storage saves every 2 steps.
Compared with an uninterrupted run of 6 steps:
  * a run that crashes after step 3 (an exception in the step: the workers end, their memory stays),
    restarted with ``checkpoint.resume=auto``: resumes from its own nodes' memory at step 3, and no
    part moves between nodes;
  * the same crash, then node 1's memory wiped: resumes from node 0's replica of node 1's part (peer);
    rank 1 receives its own part and nothing else (node 1 then holds that part only), rank 0 nothing;
  * the same crash, both nodes' memory wiped: resumes from storage at step 2;
  * node 1 wiped, then (after that recovery, before any new snapshot) node 0 wiped: resumes from the
    replica of rank 0's part the recovery sent node 1 again;
each continues with losses equal to the uninterrupted run's bit for bit and ends with a checkpoint
equal to its final checkpoint tensor for tensor; metrics.jsonl records ``resumed_from`` and
``resumed_step``. ``test_peer_recovery_receives_own_parts_only`` repeats the peer case at 4 processes
as 2 nodes of 2 ranks in 10 layouts (tp, ep, pp with a tied embedding, tp inside pp, ZeRO 0/1/2 (2 also beside tp),
fp32, bf16 with fp32 or bf16 master weights), comparing every rank's whole training state. A run that
ends normally frees its host memory; a run that resumes from an explicit storage checkpoint (a branch)
drops the snapshots of the line it left, even if it crashes at once.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import compose_run_config  # noqa: E402
from test_resume import SMALL, assert_same_checkpoint  # noqa: E402
from hpframe.testing.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.dist
STEPS, CRASH = 6, 3
LAYOUT = ["recipe=deepseek_debug", "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=1", "cluster.gpus_per_node=1",
          f"train.steps={STEPS}", "checkpoint.interval=2", "checkpoint.memory_interval=1", "checkpoint.memory_replicas=1",
          "checkpoint.keep_last=0"]


class Crash(RuntimeError):
    """Stands for a failure that ends the workers after a step (their node memory survives)."""


def _train(rank: int, world_size: int, cfg, crash_after: int | None = None) -> dict:
    """run.train_main's build sequence on the existing process group; optionally crash after a step."""
    from hpframe.data import build_data
    from hpframe.engine import build_engine
    from hpframe.engine.ds_env import prepare_deepspeed
    from hpframe.engine.moe_bridge import release_expert_groups
    from hpframe.models import build_model
    from hpframe.parallel import init_distributed, parallelize
    from hpframe.plan import make_plan
    from hpframe.train.loop import train

    prepare_deepspeed()
    plan = make_plan(cfg, world_size)
    groups = init_distributed(plan)
    model = build_model(cfg.model, cfg.moe, routing_groups=plan.experts.routing_groups if plan.experts else None)
    model.init_weights(cfg.train.seed)
    engine = build_engine(parallelize(model, plan, groups), plan, groups, cfg)
    from hpframe.checkpoint import reshard
    real_capture, captures = reshard.capture, [0]

    def counting_capture(eng):  # every copy of the training state to host memory: a snapshot or a save
        captures[0] += 1
        return real_capture(eng)
    reshard.capture = counting_capture
    if crash_after is not None:
        step, calls = engine.train_step, [0]

        def crashing(batches):
            if calls[0] == crash_after:
                raise Crash(f"crash after step {crash_after}")
            calls[0] += 1
            return step(batches)
        engine.train_step = crashing
    try:
        result = train(engine, build_data(cfg, plan, rank), plan, cfg)
        return {"losses": [r["loss"] for r in result.history], "tier": result.resumed_tier, "captures": captures[0],
                "received": result.received, "state": _state_digest(engine)}
    except Crash:
        return {"crashed": True, "captures": captures[0]}
    finally:
        reshard.capture = real_capture
        release_expert_groups(plan)


def _state_digest(engine) -> dict[str, str]:
    """sha256 of every tensor of this rank's training state: the module's parameters and persistent
    buffers, and the optimizer's master partitions, low-precision flat buffers and Adam state (ZeRO 1/2)
    or the client AdamW's state of each parameter (ZeRO 0)."""
    import hashlib

    from hpframe.checkpoint.reshard import _flat_partitions, _zero_optimizer

    out = {}

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous().reshape(-1)
        out[name] = f"{t.dtype} {t.numel()} {hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()}"

    for k, v in engine.module.state_dict().items():
        add(f"module/{k}", v)
    zo = _zero_optimizer(engine)
    if zo is not None:
        for i, flat in enumerate(_flat_partitions(zo)):
            add(f"master/{i}", flat)
            for k, v in zo.optimizer.state.get(flat, {}).items():
                add(f"master/{i}/{k}", v)
        for i, flat in enumerate(getattr(zo, "bit16_groups_flat", None) or zo.bf16_groups_flat):
            add(f"lp_flat/{i}", flat)
    else:
        for name, p in engine.module.named_parameters():
            for k, v in engine.optimizer.state.get(p, {}).items():
                add(f"adam/{name}/{k}", v)
    return out


def _scenarios(rank: int, world_size: int, root: str) -> dict:
    import torch.distributed as dist

    root_p = Path(root)

    def cfg(name: str, *extra: str):
        c = compose_run_config(*SMALL, *LAYOUT, f"checkpoint.memory_dir={root_p / 'shm'}", *extra)
        c.output_dir = str(root_p / name)
        return c

    def restore_crash_state() -> None:  # rank 0 puts back the run dir and memory the crash left
        if rank == 0:
            for d in ("run", "shm"):
                shutil.rmtree(root_p / d, ignore_errors=True)
                shutil.copytree(root_p / f"{d}.crashed", root_p / d)
        dist.barrier()

    out = {"ref": _train(rank, world_size, cfg("ref", "checkpoint.resume=none"))}
    out["ref_memory_left"] = sorted(p.name for p in (root_p / "shm").iterdir())
    # snapshots every 2 steps, storage every 3, crash in step 5: the save at step 3 wrote the snapshot of step 2
    sparse = ("checkpoint.memory_interval=2", "checkpoint.interval=3")
    out["sparse"] = _train(rank, world_size, cfg("sparse", "checkpoint.resume=none", *sparse), crash_after=4)
    dist.barrier()
    if rank == 0:  # set its host memory (snapshots of steps 2 and 4) aside for the test to compare
        for job in (root_p / "shm").iterdir():
            job.rename(root_p / "sparse.shm")
    dist.barrier()
    from_snapshot = root_p / "sparse" / "checkpoints" / "step_00000002"
    out["sparse_resumed"] = _train(rank, world_size, cfg("sparse_resumed", f"checkpoint.resume={from_snapshot}", *sparse))
    out["crash"] = _train(rank, world_size, cfg("run", "checkpoint.resume=none"), crash_after=CRASH)
    dist.barrier()
    if rank == 0:
        for d in ("run", "shm"):
            shutil.copytree(root_p / d, root_p / f"{d}.crashed")
    dist.barrier()
    for name, wiped in (("memory", []), ("peer", ["node001"]), ("storage", ["node000", "node001"])):
        restore_crash_state()
        if rank == 0:
            for node in wiped:  # that node's host memory is gone (a lost or rebooted node)
                for d in (root_p / "shm").glob(f"hpframe-*/{node}"):
                    shutil.rmtree(d)
        dist.barrier()
        out[name] = _train(rank, world_size, cfg("run"))
        dist.barrier()
        if rank == 0:
            shutil.copytree(root_p / "run", root_p / f"run.{name}")
    # node 1 lost again, and the restart crashes before its first step: what node 1 holds then is what
    # the recovery sent it (its own part) and what the re-replication after it sent (node 0's part)
    restore_crash_state()
    if rank == 0:
        for d in (root_p / "shm").glob("hpframe-*/node001"):
            shutil.rmtree(d)
    dist.barrier()
    out["peer_crash"] = _train(rank, world_size, cfg("run"), crash_after=0)
    dist.barrier()
    out["node1_after_peer"] = sorted(str(p.relative_to(next((root_p / "shm").glob("hpframe-*/node001"))))
                                     for p in (root_p / "shm").glob("hpframe-*/node001/*/commit/*.json"))
    # then node 0 is lost too, before any new snapshot: the recovered snapshot survives on node 1 alone
    if rank == 0:
        for d in (root_p / "shm").glob("hpframe-*/node000"):
            shutil.rmtree(d)
    dist.barrier()
    out["peer_again"] = _train(rank, world_size, cfg("run"))
    # a branch from the step-2 checkpoint that crashes before its first step: the snapshots of the
    # abandoned line (steps 2 and 3) are gone, so a restart cannot continue the abandoned line
    restore_crash_state()
    branch = cfg("run", f"checkpoint.resume={root_p / 'run' / 'checkpoints' / 'step_00000002'}")
    out["branch"] = _train(rank, world_size, branch, crash_after=0)
    dist.barrier()
    out["branch_memory_left"] = sorted(p.name for p in (root_p / "shm").glob("hpframe-*/node*/*"))
    return out


def _resume_record(run_dir: Path) -> dict:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "resumed_from" in r][-1]


def test_resume_from_memory_peer_and_storage(tmp_path):
    results = run_distributed(_scenarios, 2, (str(tmp_path),), timeout=240)
    r = results[0]
    ref = r["ref"]["losses"]
    assert len(ref) == STEPS and r["ref"]["tier"] is None
    assert r["ref_memory_left"] == []  # a run that ended normally freed its host memory
    assert r["ref"]["captures"] == STEPS  # one per snapshot; the storage saves wrote the snapshots of their steps
    _check_save_from_snapshot(tmp_path, results, ref)
    assert r["crash"] == {"crashed": True, "captures": CRASH}
    final = f"step_{STEPS:08d}"
    for name, first in (("memory", CRASH), ("peer", CRASH), ("storage", 2)):
        got = r[name]
        assert got["tier"] == name, (name, got)
        assert got["losses"] == ref[first:], f"{name}: {got['losses']} != {ref[first:]}"
        assert _resume_record(tmp_path / f"run.{name}") == {"step": first, "resumed_from": name, "resumed_step": first}
        assert assert_same_checkpoint(tmp_path / "ref" / "checkpoints" / final, tmp_path / f"run.{name}" / "checkpoints" / final) >= 30
    assert results[1]["memory"]["losses"] == r["memory"]["losses"]
    # from peer: node 1 (rank 1) received its own part, and only it; node 0 received nothing (before,
    # node 1 received both parts)
    size = _packed_part_bytes(tmp_path / "shm.crashed", CRASH, world=2)[1]
    assert [(x["peer"]["received"].parts, x["peer"]["received"].bytes) for x in results] == [((), 0), ((1,), size)]
    # after the recovery node 1 holds its own part (sent by the recovery) and node 0's (sent again in
    # the background): losing node 0 next still resumes from memory (before, node 1 held its own part
    # only, and the restart fell back to storage at step 2)
    assert r["node1_after_peer"] == [f"step_{CRASH:08d}/commit/rank00000.json", f"step_{CRASH:08d}/commit/rank00001.json"]
    assert r["peer_again"]["tier"] == "peer" and r["peer_again"]["losses"] == ref[CRASH:], r["peer_again"]
    for x in results:  # from memory: nothing moves
        assert (x["memory"]["received"].parts, x["memory"]["received"].bytes) == ((), 0)
    assert r["branch"] == {"crashed": True, "captures": 0} and r["branch_memory_left"] == []


def _check_save_from_snapshot(tmp_path: Path, results: list[dict], ref: list[float]) -> None:
    """Snapshots at steps 2 and 4, a storage save at step 3, a crash in step 5: the save holds the
    snapshot of step 2 (no capture of its own), file for file the bytes of that snapshot in host
    memory (every tensor bit for bit, RNG states and layout equal), and a run resumed from it continues
    exactly."""
    for r in results:
        assert r["sparse"] == {"crashed": True, "captures": 2}, r["sparse"]  # the 2 snapshots, none for the save
        assert r["sparse_resumed"]["losses"] == ref[2:], r["sparse_resumed"]
    saved = tmp_path / "sparse" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in saved.parent.glob("step_*")) == ["step_00000002"]
    snap = tmp_path / "sparse.shm" / "node000" / "step_00000002"
    for rank in (0, 1):
        rel = f"tensors/rank{rank:05d}.safetensors"
        got, want = (safetensors.torch.load((d / rel).read_bytes()) for d in (saved, snap))
        assert got.keys() == want.keys() and len(got) >= 30
        assert all(torch.equal(got[k], want[k]) for k in got), rel
        for rel in (f"rng/rank{rank:05d}.json", f"layout/rank{rank:05d}.json"):  # written with other indentation
            assert json.loads((saved / rel).read_text()) == json.loads((snap / rel).read_text()), rel
    state = json.loads((saved / "client_state.json").read_text())
    snap_state = json.loads((snap / "client/rank00000.json").read_text())
    assert state["step"] == 2 and all(state[k] == snap_state[k] for k in ("step", "consumed_tokens", "data"))
    final = f"step_{STEPS:08d}"
    assert assert_same_checkpoint(tmp_path / "ref" / "checkpoints" / final,
                                  tmp_path / "sparse_resumed" / "checkpoints" / final) >= 30


# ---- peer recovery in several layouts: 4 processes as 2 nodes of 2 ranks; node 1 loses its memory ----
PEER_STEPS, PEER_CRASH = 4, 2
PEER_LAYOUTS = {
    # tp-replicated tensors (norms, router, experts) restored on tp rank 1 from tp rank 0's part
    "tp2_ep2_zero1": ["recipe=mixtral_debug", "parallel.tp=2", "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=1"],
    # ZeRO 0: every share all-gathered over dp / edp; router biases broadcast from dp rank 0
    "tp2_ep2_zero0": ["recipe=deepseek_debug", "parallel.tp=2", "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=0"],
    # bf16 weights, fp32 master: ZeRO-2 (DeepSpeed's ZeRO optimizer) and ZeRO-1 (BF16_Optimizer), edp 2
    "ep2_zero2_bf16": ["recipe=deepseek_debug", "parallel.dp=4", "parallel.ep=2", "parallel.zero_stage=2", "train.dtype=bf16"],
    "ep2_zero1_bf16": ["recipe=mixtral_debug", "parallel.dp=4", "parallel.ep=2", "parallel.zero_stage=1", "train.dtype=bf16"],
    # bf16 master weights: ZeRO-1's bf16 partitions; ZeRO 0's plain bf16 AdamW
    "ep2_zero1_bf16_master": ["recipe=mixtral_debug", "parallel.dp=4", "parallel.ep=2", "parallel.zero_stage=1",
                              "train.dtype=bf16", "train.master_dtype=bf16"],
    "ep2_zero0_bf16_master": ["recipe=mixtral_debug", "parallel.dp=4", "parallel.ep=2", "parallel.zero_stage=0",
                              "train.dtype=bf16", "train.master_dtype=bf16"],
    # the tied embedding's last-stage copy (node 1) from the first stage: BF16_Optimizer in the pipeline, and ZeRO 0
    "pp2_tied_zero1_bf16": ["recipe=gpt_debug", "parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=1", "train.dtype=bf16"],
    "pp2_tied_zero0": ["recipe=gpt_debug", "parallel.pp=2", "parallel.dp=2", "parallel.zero_stage=0"],
    # ZeRO-2 beside tp: DeepSpeed's ZeRO optimizer partitions each tp rank's shards over dp, tp-replicated
    # tensors' fragments come from tp rank 0's part
    "tp2_zero2_bf16": ["recipe=mixtral_debug", "parallel.tp=2", "parallel.dp=2", "parallel.zero_stage=2", "train.dtype=bf16"],
    # tp inside pipeline stages: node 1 is the last stage (both its tp ranks), whose tied embedding
    # copy comes from the first stage's tp shards and whose tp-replicated norms from its tp rank 0
    "tp2_pp2_tied_zero1_bf16": ["recipe=gpt_debug", "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1",
                                "train.dtype=bf16"],
}


REORDERED = {"tp2_ep2_zero1": "parallel.axis_order=pp-tp-dp"}


def _peer_layouts(rank: int, world_size: int, root: str, names: list[str]) -> dict:
    import torch.distributed as dist

    out = {}
    for name in names:
        base = Path(root) / name

        def cfg(run: str, *extra: str):
            c = compose_run_config(*SMALL, *PEER_LAYOUTS[name], "cluster.gpus_per_node=2", f"train.steps={PEER_STEPS}",
                                   "checkpoint.interval=100", "checkpoint.memory_interval=1",
                                   "checkpoint.memory_replicas=1", "checkpoint.keep_last=0",
                                   f"checkpoint.memory_dir={base / 'shm'}", *extra)
            c.output_dir = str(base / run)
            return c

        got = {"ref": _train(rank, world_size, cfg("ref", "checkpoint.resume=none")),
               "crash": _train(rank, world_size, cfg("run", "checkpoint.resume=none"), crash_after=PEER_CRASH)}
        dist.barrier()
        if rank == 0:  # keep the crash's memory and run for the test, then node 1 loses its memory
            for d in ("shm", "run"):
                shutil.copytree(base / d, base / f"{d}.crashed")
            for d in (base / "shm").glob("hpframe-*/node001"):
                shutil.rmtree(d)
        dist.barrier()
        got["peer"] = _train(rank, world_size, cfg("run"))
        if name in REORDERED:
            # the crash restarted with another rank order (the plan fingerprint leaves it out): the
            # snapshot's parts belong to other coordinates, so it is not resumed from; the run starts over
            dist.barrier()
            if rank == 0:
                for d in ("shm", "run"):
                    shutil.rmtree(base / d, ignore_errors=True)
                    shutil.copytree(base / f"{d}.crashed", base / d)
            dist.barrier()
            got["reordered"] = _train(rank, world_size, cfg("run", REORDERED[name]))
        out[name] = got
    return out


def _packed_part_bytes(root: Path, step: int, world: int = 4) -> dict[int, int]:
    """Bytes of each rank's part of ``step`` as the fast tier sends it (packed files), from node 0's memory."""
    from hpframe.checkpoint.memory import pack_part, step_dir

    (node0,) = root.glob("hpframe-*/node000")
    here = step_dir(node0, step)
    return {r: pack_part(here, r).numel() for r in range(world)}


@pytest.mark.parametrize("names", [list(PEER_LAYOUTS)[:4], list(PEER_LAYOUTS)[4:]], ids=["tp_zero_bf16", "master_pp_tp"])
def test_peer_recovery_receives_own_parts_only(tmp_path, names):
    """For each layout: an uninterrupted run of 4 steps, and a run that crashes after step 2 whose node 1
    (ranks 2 and 3) then loses its memory. The restart resumes from the replicas on node 0 (peer): rank 2
    and rank 3 each receive their own part and nothing else (node 1 receives 2 of the 4 parts; before,
    every part it lacked, all 4), ranks 0 and 1 nothing; the losses of steps 3-4 and every rank's whole
    training state at the end (weights, buffers, master partitions, low-precision flat buffers, Adam
    state) equal the uninterrupted run's bit for bit. The crash restarted with another
    ``parallel.axis_order`` (same plan fingerprint, other coordinates per rank) does not resume from
    the snapshot: it starts over."""
    results = run_distributed(_peer_layouts, 4, (str(tmp_path), names), timeout=600)
    for name in names:
        sizes = _packed_part_bytes(tmp_path / name / "shm.crashed", PEER_CRASH)
        for rank, by_rank in enumerate(results):
            r = by_rank[name]
            assert r["crash"]["crashed"], (name, rank)
            assert r["peer"]["tier"] == "peer", (name, rank, r["peer"]["tier"])
            assert r["peer"]["losses"] == r["ref"]["losses"][PEER_CRASH:], (name, rank)
            received = r["peer"]["received"]
            want = ((rank,), sizes[rank]) if rank >= 2 else ((), 0)
            assert (received.parts, received.bytes) == want, (name, rank, received)
            diff = sorted(k for k in r["ref"]["state"] if r["ref"]["state"][k] != r["peer"]["state"].get(k))
            assert r["ref"]["state"].keys() == r["peer"]["state"].keys() and not diff, (name, rank, diff)
            if name in REORDERED:
                assert r["reordered"]["tier"] is None and len(r["reordered"]["losses"]) == PEER_STEPS, (name, rank)
