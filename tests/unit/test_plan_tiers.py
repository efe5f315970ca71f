"""The planner's two-tier checkpoint model (hpframe/plan/tiers.py) without processes.

Compared: the fast tier's figures for deepseek_v3 on h800x2048 with the formulas of the module docstring
recomputed here from the plan's own inputs (host memory with the GPU ranks' staging buffers, none on a
CPU cluster); the refusal of a plan whose host memory cannot hold the
snapshots (key and numbers named); replicas clamped to nodes - 1 with a warning on one node; negative
settings refused; the JSON of the dry run carries checkpoint.memory.
"""

from __future__ import annotations

import json
import math

import pytest

from hpframe.plan import PlanError, make_plan
from hpframe.plan.memory import GIB
from hpframe.plan.report import plan_to_dict


def test_fast_tier_figures(compose_cfg):
    cfg = compose_cfg("recipe=deepseek_v3", "checkpoint.memory_interval=2", "checkpoint.memory_replicas=2")
    plan = make_plan(cfg)
    ck, mem = plan.checkpoint, plan.checkpoint.memory
    c = cfg.cluster
    per_rank = math.ceil(ck.bytes / plan.world_size)
    assert mem.enabled and mem.replicas == 2 and mem.snapshot_bytes_per_rank == per_rank
    # own + 2 replicas for 2 steps, plus 2 page-locked staging buffers per rank on a GPU cluster
    assert cfg.cluster.device.value == "cuda"
    assert mem.host_bytes_per_node == 2 * plan.gpus_per_node * per_rank * 3 + 2 * plan.gpus_per_node * per_rank
    assert mem.snapshot_stall_seconds == pytest.approx(per_rank / (c.host_copy_bw_GBps * 1e9))
    assert mem.replica_seconds == pytest.approx(2 * per_rank / (c.inter_node_bw_GBps * 1e9))
    assert mem.write_seconds == pytest.approx(per_rank / (c.host_write_GBps * 1e9))
    assert mem.interval_seconds == pytest.approx(math.sqrt(2 * mem.snapshot_stall_seconds * ck.job_mtbf_seconds))
    step = plan.time.step_seconds
    assert mem.lost_work_seconds_with == pytest.approx(2 * step / 2 + mem.snapshot_stall_seconds)
    assert mem.lost_work_seconds_without == pytest.approx(ck.interval_seconds / 2 + ck.write_seconds)
    assert mem.lost_work_seconds_with < mem.lost_work_seconds_without / 10
    assert json.loads(json.dumps(plan_to_dict(plan, cfg)))["checkpoint"]["memory"]["host_bytes_per_node"] == mem.host_bytes_per_node


def test_interval_is_no_shorter_than_stall_write_and_transfer(compose_cfg):
    # a rare failure rate makes Young/Daly long; a slow write to node memory makes the floor longer
    # still: the next snapshot must not start before the previous one is written and replicated
    cfg = compose_cfg("recipe=deepseek_v3", "checkpoint.memory_interval=1", "cluster.host_write_GBps=0.001")
    mem = make_plan(cfg).checkpoint.memory
    floor = mem.snapshot_stall_seconds + mem.write_seconds + mem.replica_seconds
    assert mem.write_seconds == pytest.approx(mem.snapshot_bytes_per_rank / 1e6)
    assert floor > math.sqrt(2 * mem.snapshot_stall_seconds * make_plan(cfg).checkpoint.job_mtbf_seconds)
    assert mem.interval_seconds == pytest.approx(floor)
    with pytest.raises(PlanError, match=r"cluster.host_write_GBps=0"):
        make_plan(compose_cfg("recipe=deepseek_v3", "cluster.host_write_GBps=0"))


def test_snapshots_that_do_not_fit_host_memory_are_refused(compose_cfg):
    args = ("recipe=deepseek_v3", "checkpoint.memory_interval=1", "checkpoint.memory_replicas=3")
    need = make_plan(compose_cfg(*args, "cluster.host_memory_gb=1e6")).checkpoint.memory.host_bytes_per_node
    with pytest.raises(PlanError, match=r"the fast tier needs .* GiB of host memory per node .* > cluster.host_memory_gb=100") as err:
        make_plan(compose_cfg(*args, "cluster.host_memory_gb=100"))
    assert err.value.key == "checkpoint.memory_interval, checkpoint.memory_replicas, cluster.host_memory_gb"
    assert err.value.values["host_bytes_per_node"] == need > 100 * GIB
    make_plan(compose_cfg(*args[:2], "checkpoint.memory_interval=0", "cluster.host_memory_gb=100"))  # off: no check


def test_one_node_clamps_replicas_and_bad_settings_are_refused(compose_cfg):
    plan = make_plan(compose_cfg("recipe=mixtral_debug", "checkpoint.memory_interval=1"), 2)
    assert plan.num_nodes == 1 and plan.checkpoint.memory.replicas == 0
    mem = plan.checkpoint.memory  # a CPU cluster: no staging buffers
    assert mem.host_bytes_per_node == 2 * min(plan.gpus_per_node, plan.world_size) * mem.snapshot_bytes_per_rank
    assert any("checkpoint.memory_replicas=1 but only 1 node(s)" in w for w in plan.warnings)
    for key in ("checkpoint.memory_interval", "checkpoint.memory_replicas"):
        with pytest.raises(PlanError, match=rf"{key}=-1 must be >= 0"):
            make_plan(compose_cfg("recipe=mixtral_debug", f"{key}=-1"))
