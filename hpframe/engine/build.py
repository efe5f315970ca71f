"""build_engine(model, plan, groups, cfg): a DeepSpeed engine (ZeRO, pipeline, expert groups) from the plan.

Order of construction (every rank, the model already parallelized by ``hpframe.parallel.parallelize``):
  1. DeepSpeed's comm layer on the existing torch.distributed group (no shm op build on CPU)
  2. the config dict from ``plan.deepspeed_config`` (explicit values, clipping off: see step.py)
  3. expert tags and hpframe's EP/EDP groups registered with DeepSpeed (moe_bridge)
  4. pp > 1: ``PlanPipelineModule`` on DeepSpeed's ``ProcessTopology`` of the plan (checked rank by
     rank against plan.ranks); pp == 1: the model itself with a ``PlanMPU``
  5. client ``SkippableAdamW`` (decay on matrices only, expert weights in ``moe`` groups)
  6. the DeepSpeed engine class (expert-aware), then ``StepGuard`` around its optimizer step

The engine classes are constructed directly instead of through ``deepspeed.initialize`` (which
does steps 4-6 with DeepSpeed's classes) so that ``has_moe_layers`` follows hpframe's tags.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hpframe.engine import bf16_grads
from hpframe.engine.compat import check_libraries
from hpframe.engine.ds_env import init_deepspeed_comm
from hpframe.logging import get_logger
from hpframe.machine import probe, resolve_device
from hpframe.plan.deepspeed_config import deepspeed_config


def build_engine(model: nn.Module, plan: Any, groups: Any, cfg: Any) -> Any:
    """Wrap the (parallelized, materialized) ``model`` in a DeepSpeed engine; returns ``hpframe.engine.Engine``."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from hpframe.engine.engine import Engine
    from hpframe.engine.moe_bridge import (
        ExpertAwareEngine,
        ExpertAwarePipelineEngine,
        optimizer_param_groups,
        register_expert_groups,
        tag_expert_params,
    )
    from hpframe.engine.step import SkippableAdamW, StepGuard
    from hpframe.engine.topology import PlanMPU, check_topology, process_topology

    for warning in check_libraries():
        get_logger(__name__).warning(warning)
    init_deepspeed_comm()
    device = resolve_device(cfg, probe())  # cpu or cuda: machine.py decides, as for the placement check
    dtype = str(getattr(cfg.train.dtype, "value", cfg.train.dtype))
    master = str(getattr(cfg.train.master_dtype, "value", cfg.train.master_dtype))
    # (bf16 with fp32 master weights under ZeRO 0 is refused by the planner: plan/validate.py)
    ds_cfg = deepspeed_config(plan, dtype=dtype, device=device, master_dtype=master)
    if dtype == "bf16" and not ds_cfg["bf16"]["enabled"]:
        # pure bf16 under ZeRO 0 (see deepspeed_config): the parameters become bf16 here, buffers
        # (rotary tables, router bias and load counts) stay fp32 as DeepSpeed's own cast keeps them
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    tag_expert_params(model, plan)
    register_expert_groups(plan, groups)
    loss_fn = None
    if plan.pp > 1:
        from hpframe.parallel.pipeline import PipelineLoss, PlanPipelineModule

        topo = process_topology(plan)
        check_topology(plan, topo)
        loss_fn = PipelineLoss(groups.tp)
        module: nn.Module = PlanPipelineModule(model, plan, groups, topo, loss_fn)
        mpu: Any = module.mpu()
        _check_grid(plan, mpu)
        engine_cls: type = ExpertAwarePipelineEngine
    else:
        module, mpu, engine_cls = model, PlanMPU(plan, dist.get_rank(), groups), ExpertAwareEngine
    t = cfg.train
    optimizer = SkippableAdamW(
        optimizer_param_groups(module, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), weight_decay=t.weight_decay,
        fused=True,  # one kernel for the whole update (CUDA and CPU); it takes the guard's verdict on the device
    )
    ds = engine_cls(
        args=None,
        model=module,
        optimizer=optimizer,
        model_parameters=None,
        training_data=None,
        lr_scheduler=None,
        mpu=mpu,
        dist_init_required=False,
        collate_fn=None,
        config=ds_cfg,
        config_class=DeepSpeedConfig(ds_cfg, mpu),
    )
    bf16_grads.install(ds.optimizer)
    if t.overlap_optimizer and device != "cuda":
        get_logger(__name__).warning("train.overlap_optimizer has no effect on the CPU (no streams): the update runs in place")
    elif t.overlap_optimizer:  # (the planner allows it with ZeRO 0 and pp 1 only)
        if ds.optimizer is not optimizer:
            raise ValueError(f"train.overlap_optimizer: DeepSpeed wrapped the optimizer in {type(ds.optimizer).__name__}; "
                             "the overlap needs hpframe's AdamW to update the parameters itself")
        optimizer.overlap_with_forward(module)
    coords = plan.ranks.coords(dist.get_rank())
    guard = StepGuard(ds, optimizer, groups, grad_clip=t.grad_clip, tp_rank=coords["tp"])
    return Engine(ds=ds, plan=plan, groups=groups, optimizer=optimizer, guard=guard, loss_fn=loss_fn,
                  compile_loss=bool(t.compile))


def _check_grid(plan: Any, grid: Any) -> None:
    """DeepSpeed's PipelineParallelGrid built its own groups: its members must be the plan's."""
    rank = dist.get_rank()
    for axis, ours in (("dp", grid.dp_group), ("pp", grid.pp_group)):
        if tuple(sorted(ours)) != plan.ranks.group(axis, rank):
            raise ValueError(f"rank {rank}: DeepSpeed's {axis} group {ours} differs from the plan's {plan.ranks.group(axis, rank)}")
    if grid.get_stage_id() != plan.ranks.coords(rank)["pp"]:
        raise ValueError(f"rank {rank}: DeepSpeed stage {grid.get_stage_id()} differs from the plan's pp coordinate")
