"""assemble_plan: RunConfig (+ world size) -> ParallelPlan, every step of make_plan but one.

A plan over the device's memory (``plan.memory_check=true``) is refused with the numbers only
(MemoryRefusal); ``make_plan`` (plan/planner.py) adds the settings that fit, which it finds by
assembling candidate plans here (plan/suggest.py). Pure: no torch, no processes, no environment.
"""

from __future__ import annotations

from hpframe.config.schema import RunConfig
from hpframe.plan.estimates import add_estimates
from hpframe.plan.experts import make_expert_plan
from hpframe.plan.mesh import resolve_batch, resolve_degrees
from hpframe.plan.params import moe_layers
from hpframe.plan.pipeline import make_pipeline
from hpframe.plan.ranks import RankLayout, parse_axis_order
from hpframe.plan.types import ParallelPlan
from hpframe.plan.validate import (
    validate_cluster,
    validate_model,
    validate_model_build,
    validate_parallel,
    validate_train,
)


def assemble_plan(cfg: RunConfig, world_size: int | None = None) -> ParallelPlan:
    """Resolve degrees and batch, lay out ranks, partition the pipeline, place experts, estimate costs.

    ``world_size`` defaults to cluster.nodes * cluster.gpus_per_node (tp*pp*dp for gpus_per_node=-1).
    Raises PlanError, naming keys and numbers, on any impossible or unsafe combination (MemoryRefusal,
    with the numbers only, for memory over the device; use ``make_plan``, which adds settings that fit).
    """
    warnings: list[str] = []
    validate_model(cfg, warnings)
    validate_train(cfg, warnings)
    validate_cluster(cfg)
    order = parse_axis_order(cfg.parallel.axis_order)
    d = resolve_degrees(cfg, world_size)
    validate_parallel(cfg, d, warnings)
    batch = resolve_batch(cfg, d, warnings)
    ranks = RankLayout(tp=d.tp, pp=d.pp, dp=d.dp, ep=d.ep, axis_order=order, gpus_per_node=d.gpus_per_node)
    pipeline = make_pipeline(cfg.model, cfg.moe, d.pp, list(cfg.parallel.pipeline_layout), cfg.data.seq_len)
    experts = make_expert_plan(cfg.moe, ranks, warnings)
    validate_model_build(cfg.model, cfg.moe, experts.routing_groups if experts is not None else cfg.moe.num_expert_groups)
    plan = ParallelPlan(
        world_size=d.world_size,
        tp=d.tp,
        pp=d.pp,
        dp=d.dp,
        ep=d.ep,
        edp=d.edp,
        zero_stage=d.zero_stage,
        micro_batch_size=batch.micro_batch_size,
        grad_accum=batch.grad_accum,
        global_batch_size=batch.global_batch_size,
        seq_len=cfg.data.seq_len,
        num_nodes=d.num_nodes,
        gpus_per_node=d.gpus_per_node,
        ranks=ranks,
        pipeline=pipeline,
        experts=experts,
        moe_layers=moe_layers(cfg.model, cfg.moe),
    )
    return add_estimates(plan, cfg, warnings)
