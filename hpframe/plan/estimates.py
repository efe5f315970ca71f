"""Cost estimates attached to a plan: parameters, FLOPs, memory, communication, time, checkpoint.

Time: compute = (flops_per_token + (tp - 1) x the MoE MLPs' FLOPs, which every TP rank repeats) *
tokens per step / (world * peak * assumed MFU), stretched by the
1F1B bubble (pp - 1) / (grad_accum + pp - 1), times 4/3 under full recompute (selective adds one more
forward of the MoE MLPs); comm = intra-node bytes / intra_node_bw + inter-node
bytes / inter_node_bw of the busiest stage, with no overlap, the all-to-all's bytes at
cluster.all_to_all_efficiency of the link and cluster.collective_latency_us per all-to-all call (and per
all-gather/reduce-scatter of moe.dispatch=experts, whose bytes move at the full link bandwidth);
step = compute + comm (an upper bound).
Checkpoint: bytes = total params * 12 (fp32 master weight + two fp32 Adam moments: the portable
checkpoint hpframe writes, independent of dtype and layout); write = bytes /
storage_bw; job MTBF = gpu_mtbf_hours / world_size; Young/Daly interval = sqrt(2 * write * MTBF);
save timeout (each wait of the save protocol) = checkpoint.save_timeout_s, or max(60 s, 10 x write).
"""

from __future__ import annotations

import dataclasses
import math

from hpframe.config.schema import Recompute, RunConfig
from hpframe.plan.comm import estimate_comm
from hpframe.plan.dispatch import resolve_dispatch
from hpframe.plan.errors import MemoryRefusal, PlanError
from hpframe.plan.memory import GIB, estimate_memory
from hpframe.plan.params import count_params, flops_per_token, moe_fwd_flops
from hpframe.plan.tiers import estimate_memory_tier
from hpframe.plan.types import CheckpointEstimate, CommEstimate, ParallelPlan, TimeEstimate


def estimate_time(cfg: RunConfig, plan: ParallelPlan, comm: CommEstimate) -> TimeEstimate:
    c = cfg.cluster
    tokens = plan.global_batch_size * plan.seq_len
    mfu = cfg.plan.assumed_mfu
    # full recompute runs every forward twice: 4 forward-equivalents instead of 3
    redo = 4 / 3 if cfg.parallel.recompute == Recompute.full else 1.0
    # every TP rank runs the (replicated) MoE MLPs on all tokens: (tp - 1) extra copies of that work;
    # selective recompute runs the MoE MLPs' forward once more in backward (on every TP rank)
    moe_fwd = moe_fwd_flops(cfg.model, cfg.moe)
    work = plan.flops_per_token + (plan.tp - 1) * 3 * moe_fwd
    if cfg.parallel.recompute == Recompute.selective:
        work += plan.tp * moe_fwd
    ideal = redo * work * tokens / (plan.world_size * c.peak_tflops * 1e12 * mfu)
    bubble = (plan.pp - 1) / (plan.grad_accum + plan.pp - 1)
    compute = ideal / (1 - bubble)
    a2a = comm.parts.get("moe_all_to_all", {"intra": 0, "inter": 0})
    intra = sum(p["intra"] for p in comm.parts.values()) - a2a["intra"]
    inter = sum(p["inter"] for p in comm.parts.values()) - a2a["inter"]
    eff = c.all_to_all_efficiency
    comm_s = (intra + a2a["intra"] / eff) / (c.intra_node_bw_GBps * 1e9)
    comm_s += (inter + a2a["inter"] / eff) / (c.inter_node_bw_GBps * 1e9)
    comm_s += (comm.all_to_all_calls + comm.fetch_calls) * c.collective_latency_us * 1e-6
    return TimeEstimate(
        assumed_mfu=mfu,
        compute_seconds=compute,
        bubble_fraction=bubble,
        comm_seconds=comm_s,
        step_seconds=compute + comm_s,
        tokens_per_step=tokens,
    )


CHECKPOINT_BYTES_PER_PARAM = 12
SAVE_TIMEOUT_FLOOR_S = 60.0
"""Least time a save waits for a rank (start-up jitter, a slow file system's first write)."""
SAVE_TIMEOUT_WRITES = 10.0
"""A wait of the save protocol gives up after this many planned write times of a whole checkpoint."""
"""Bytes per parameter in a checkpoint: fp32 weight, fp32 exp_avg, fp32 exp_avg_sq."""


def estimate_checkpoint(cfg: RunConfig, plan: ParallelPlan, step_seconds: float) -> CheckpointEstimate:
    assert plan.params is not None
    # what hpframe writes (hpframe/checkpoint/portable.py): every parameter once, as fp32 master weight
    # plus Adam's exp_avg and exp_avg_sq, whatever the training dtype and the parallel layout
    nbytes = plan.params.total * CHECKPOINT_BYTES_PER_PARAM
    write = nbytes / (cfg.cluster.storage_bw_GBps * 1e9)
    mtbf = cfg.cluster.gpu_mtbf_hours * 3600 / plan.world_size
    interval = math.sqrt(2 * write * mtbf)
    steps = max(1, round(interval / step_seconds)) if step_seconds > 0 else 1
    if not (cfg.checkpoint.save_timeout_s >= 0 and math.isfinite(cfg.checkpoint.save_timeout_s)):
        raise PlanError(f"checkpoint.save_timeout_s={cfg.checkpoint.save_timeout_s} must be a finite number >= 0 "
                        f"(0 = derived from the planned write time)", key="checkpoint.save_timeout_s",
                        values={"checkpoint.save_timeout_s": cfg.checkpoint.save_timeout_s})
    timeout = cfg.checkpoint.save_timeout_s or max(SAVE_TIMEOUT_FLOOR_S, SAVE_TIMEOUT_WRITES * write)
    return CheckpointEstimate(bytes=nbytes, write_seconds=write, job_mtbf_seconds=mtbf, interval_seconds=interval,
                              interval_steps=steps, save_timeout_seconds=timeout)


def add_estimates(plan: ParallelPlan, cfg: RunConfig, warnings: list[str]) -> ParallelPlan:
    """Return ``plan`` with params, flops, memory, comm, time and checkpoint filled in.

    Raises MemoryRefusal (a PlanError) when the worst rank's memory exceeds the device and
    plan.memory_check is on; otherwise that becomes a warning.
    """
    plan = dataclasses.replace(
        plan,
        params=count_params(cfg.model, cfg.moe, plan.tp),
        flops_per_token=flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len),
    )
    plan = resolve_dispatch(cfg, plan, warnings)
    memory = estimate_memory(cfg, plan)
    if memory.total > memory.device_bytes:
        msg = (
            f"estimated memory of pipeline stage {memory.stage} is {memory.total / GIB:.1f} GiB per GPU "
            f"(weights {memory.weights / GIB:.1f}, gradients {memory.gradients / GIB:.1f}, optimizer {memory.optimizer / GIB:.1f}, "
            f"activations {memory.activations / GIB:.1f}"
            + (f", fetched experts {memory.fetched_experts / GIB:.1f} under moe.dispatch=experts" if memory.fetched_experts else "")
            + f") > cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g}"
            f" (tp={plan.tp} pp={plan.pp} dp={plan.dp} ep={plan.ep} zero_stage={plan.zero_stage} recompute={cfg.parallel.recompute.value})"
        )
        if cfg.plan.memory_check:  # make_plan re-raises it naming settings that fit (plan/planner.py)
            raise MemoryRefusal(
                msg,
                key="cluster.gpu_memory_gb, plan.memory_check",
                values={"memory_per_gpu_bytes": memory.total, "cluster.gpu_memory_gb": cfg.cluster.gpu_memory_gb,
                        "device_bytes": memory.device_bytes, "world_size": plan.world_size},
            )
        warnings.append("OUT OF MEMORY: " + msg)
    comm = estimate_comm(cfg, plan)
    time = estimate_time(cfg, plan, comm)
    ck = estimate_checkpoint(cfg, plan, time.step_seconds)
    ck = dataclasses.replace(ck, memory=estimate_memory_tier(cfg, plan, ck, time.step_seconds, warnings))
    return dataclasses.replace(
        plan,
        memory=memory,
        comm=comm,
        time=time,
        checkpoint=ck,
        warnings=tuple(warnings),
    )
