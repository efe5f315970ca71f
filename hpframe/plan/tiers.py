"""The two-tier checkpoint model: snapshots in host memory (replicated to peer nodes) and storage.

Inputs: the checkpoint's bytes (``estimate_checkpoint``: 12 bytes per parameter), the layout, the
cluster (host memory per node, device-to-host and inter-node bandwidth, failure rate) and
``checkpoint.memory_interval`` / ``memory_replicas``. Every rank keeps its own share (hpframe writes
every tensor once, spread over all ranks), so:

  snapshot per rank      S = bytes / world_size                       (a mean; see docs/checkpointing.md)
  host memory per node   H = 2 x gpus_per_node x S x (1 + replicas)  (own + replicas, the newest
                                                                        complete step and the one being taken)
                           + 2 x gpus_per_node x S on GPU clusters   (each rank's page-locked staging
                                                                        buffers, checkpoint/host_copy.py)
  snapshot stall         S / host_copy_bw                             (device -> host copy; the write to
                                                                        shared memory runs in the background;
                                                                        on GPUs the copy runs beside the next
                                                                        forward and backward, so this bounds
                                                                        what the step loses)
  write to node memory   S / host_write_bw                            (background, the rank's thread)
  replica transfer       S x replicas / inter_node_bw                 (background, after the write; both
                                                                        must end before the next snapshot)
  memory interval        max(sqrt(2 x stall x MTBF), stall + write + transfer)   Young/Daly on the stall
  lost work per failure  with the fast tier: memory interval / 2 (+ the stall); without: the storage
                         interval / 2 (+ the write). A failure of more than ``replicas`` nodes at once
                         falls back to storage.
Pure arithmetic: no torch.
"""

from __future__ import annotations

import math

from hpframe.config.schema import Device, RunConfig
from hpframe.plan.errors import PlanError
from hpframe.plan.memory import GIB
from hpframe.plan.types import CheckpointEstimate, MemoryTierEstimate, ParallelPlan

SNAPSHOTS_KEPT = 2
"""Steps a node keeps per part: the newest complete snapshot and the one being taken."""
STAGING_BUFFERS = 2
"""Page-locked host buffers of a snapshot's size per rank on GPUs: the snapshot being copied and the
previous one while its storage save may still read it (checkpoint/host_copy.py)."""


def _check_settings(cfg: RunConfig) -> None:
    ck = cfg.checkpoint
    for key, value in (("checkpoint.memory_interval", ck.memory_interval), ("checkpoint.memory_replicas", ck.memory_replicas)):
        if value < 0:
            raise PlanError(f"{key}={value} must be >= 0", key=key, values={key: value})


def estimate_memory_tier(cfg: RunConfig, plan: ParallelPlan, ck: CheckpointEstimate, step_seconds: float,
                         warnings: list[str]) -> MemoryTierEstimate:
    """The fast tier's figures for this plan (also when it is off: what it would cost and save).

    Raises PlanError when ``checkpoint.memory_interval`` > 0 and the snapshots do not fit
    ``cluster.host_memory_gb``.
    """
    _check_settings(cfg)
    c, interval = cfg.cluster, cfg.checkpoint.memory_interval
    replicas = min(cfg.checkpoint.memory_replicas, plan.num_nodes - 1)
    if interval > 0 and cfg.checkpoint.memory_replicas > replicas:
        warnings.append(f"checkpoint.memory_replicas={cfg.checkpoint.memory_replicas} but only {plan.num_nodes} node(s): "
                        f"{replicas} replica(s) per snapshot" + ("; losing a node loses its snapshots" if replicas == 0 else ""))
    per_rank = math.ceil(ck.bytes / plan.world_size)
    ranks = min(plan.gpus_per_node, plan.world_size)
    staging = STAGING_BUFFERS if c.device == Device.cuda else 0
    per_node = SNAPSHOTS_KEPT * ranks * per_rank * (1 + replicas) + staging * ranks * per_rank
    host = c.host_memory_gb * GIB
    if interval > 0 and per_node > host:
        buffers = f" + {staging} staging buffers x {ranks} ranks x {per_rank / GIB:.2f} GiB" if staging else ""
        raise PlanError(
            f"the fast tier needs {per_node / GIB:.1f} GiB of host memory per node ({SNAPSHOTS_KEPT} steps x "
            f"{ranks} ranks x {per_rank / GIB:.2f} GiB x (1 + {replicas} replicas){buffers}) "
            f"> cluster.host_memory_gb={c.host_memory_gb:g}; lower checkpoint.memory_replicas, spread the model over more "
            f"nodes, or set checkpoint.memory_interval=0",
            key="checkpoint.memory_interval, checkpoint.memory_replicas, cluster.host_memory_gb",
            values={"host_bytes_per_node": per_node, "cluster.host_memory_gb": c.host_memory_gb,
                    "checkpoint.memory_replicas": cfg.checkpoint.memory_replicas})
    stall = per_rank / (c.host_copy_bw_GBps * 1e9)
    write = per_rank / (c.host_write_GBps * 1e9)
    transfer = per_rank * replicas / (c.inter_node_bw_GBps * 1e9)
    best = max(math.sqrt(2 * stall * ck.job_mtbf_seconds), stall + write + transfer)
    steps = max(1, math.ceil(best / step_seconds)) if step_seconds > 0 else 1
    used = interval if interval > 0 else steps
    return MemoryTierEstimate(
        enabled=interval > 0, replicas=replicas, snapshot_bytes_per_rank=per_rank, host_bytes_per_node=per_node,
        host_memory_bytes=int(host), snapshot_stall_seconds=stall, write_seconds=write, replica_seconds=transfer,
        interval_seconds=best, interval_steps=steps,
        lost_work_seconds_with=used * step_seconds / 2 + stall,
        lost_work_seconds_without=ck.interval_seconds / 2 + ck.write_seconds,
    )
