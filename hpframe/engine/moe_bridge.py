"""The one place where hpframe's experts meet DeepSpeed's MoE conventions.

DeepSpeed reduces a parameter's gradient over the expert-data-parallel group (and partitions its
ZeRO state there) when the parameter carries ``allreduce = False`` and ``group_name``, the optimizer
holds it in a param group marked ``moe: True`` (``deepspeed.moe.utils``), the group name is
registered in ``deepspeed.utils.groups``' expert registries, and the engine's ``has_moe_layers`` is
set. DeepSpeed sets that flag only for its own ``deepspeed.moe.layer.MoE`` modules and would build
the EP/EDP groups itself, with its own rank order. Here:

  * ``tag_expert_params`` tags the routed-expert weights (``GroupedExperts`` and its expert-parallel
    replacement) when ep > 1. With ep == 1 the expert-data-parallel group IS the data-parallel group,
    so experts are reduced like dense weights and stay untagged.
  * ``register_expert_groups`` puts hpframe's own ``ParallelGroups.ep``/``.edp`` handles into the
    registries under ``ep_size_<ep>`` (the name format DeepSpeed parses), after checking that their
    members are exactly the plan's rank lists. DeepSpeed then never creates expert groups.
  * ``ExpertAwareEngine`` / ``ExpertAwarePipelineEngine`` set ``has_moe_layers`` from the tags.

Gradient scaling: DeepSpeed sums an expert gradient over edp and divides by dp (not edp), which is
the data-parallel mean, because the expert already holds the gradient of the tokens of its whole EP
group (see hpframe/parallel/expert.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.utils import groups as ds_groups
from torch import nn

from hpframe.models.moe import GroupedExperts


def expert_group_name(ep: int) -> str:
    """DeepSpeed's registry key for an expert-parallel degree (``_get_max_expert_size`` parses it)."""
    return f"ep_size_{ep}"


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every routed-expert weight; shared experts and routers are dense."""
    out = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, GroupedExperts):
            out.extend((f"{mod_name}.{n}", p) for n, p in mod.named_parameters())
    return out


def tag_expert_params(model: nn.Module, plan: Any) -> int:
    """Tag routed-expert parameters for DeepSpeed's expert reduction when ep > 1; returns how many."""
    if plan.experts is None or plan.ep == 1:
        return 0
    name = expert_group_name(plan.ep)
    params = expert_parameters(model)
    for _, p in params:
        p.allreduce = False  # type: ignore[attr-defined]
        p.group_name = name  # type: ignore[attr-defined]
    return len(params)


def register_expert_groups(plan: Any, groups: Any) -> str | None:
    """Register this rank's EP and EDP process groups with DeepSpeed; returns the group name (None if ep == 1).

    Raises ValueError if a group's members differ from the plan's rank lists, or if DeepSpeed
    already holds a different group under the same name.
    """
    if plan.experts is None or plan.ep == 1:
        return None
    name = expert_group_name(plan.ep)
    rank = dist.get_rank()
    for axis, registry, rank_registry in (
        ("ep", ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS),
        ("edp", ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS),
    ):
        pg = groups.group(axis)
        members = tuple(dist.get_process_group_ranks(pg))
        expected = tuple(plan.ranks.group(axis, rank))
        if members != expected:
            raise ValueError(f"rank {rank}: {axis} process group has ranks {members}, the plan says {expected}")
        if name in registry and registry[name] is not pg:
            raise ValueError(f"DeepSpeed already has a {axis} group named {name!r} that is not hpframe's")
        registry[name] = pg
        rank_registry[name] = list(members)
    return name


def optimizer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW param groups: weight decay on matrices (ndim >= 2) only, expert weights in ``moe`` groups."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    param_groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    param_groups = [g for g in param_groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(param_groups)


def has_expert_params(model: nn.Module) -> bool:
    return any(is_moe_param(p) for p in model.parameters())


class _ExpertAware:
    """Sets DeepSpeed's ``has_moe_layers`` from hpframe's parameter tags (DeepSpeed looks for its own MoE class),
    and skips the gradient all-reduce over process groups of one rank.

    DeepSpeed's ZeRO-0 / BF16_Optimizer reduction (``allreduce_no_retain``) flattens each bucket of
    gradients into a new tensor, all-reduces it and copies it back, also when the group has a single
    member (dp = 1, or an expert-data-parallel group of one at dp = ep). There the all-reduce is the
    identity and only its scaling remains; hpframe applies that scaling in place, without the two
    copies. One difference: with bf16 on, DeepSpeed's bucket goes through its communication dtype
    (bf16 by default), which rounds BF16_Optimizer's fp32 gradients to bf16 even in a group of one;
    hpframe's shortcut keeps them in fp32 (equal to DeepSpeed with ``communication_data_type: fp32``,
    tests/dist/test_library_internals.py). Groups of several members still reduce in bf16. On one H200 with the 3.58 B-parameter mixtral_h200 model the copies of bf16 gradients
    took ~8 ms per step (docs/performance.md, section 7).
    """

    def _configure_distributed_model(self, model: nn.Module) -> None:
        super()._configure_distributed_model(model)  # type: ignore[misc]
        if has_expert_params(self.module):  # type: ignore[attr-defined]
            self.has_moe_layers = True

    def allreduce_no_retain(self, bucket: list, dp_group: Any, numel_per_bucket: int = 500000000,
                            dp_world_size: float | None = None) -> None:
        if bucket and dist.get_world_size(group=dp_group) == 1:
            factor = single_member_scale(self, 1.0 if dp_world_size is None else dp_world_size)
            if factor != 1.0:
                torch._foreach_mul_(list(bucket), factor)
            return
        super().allreduce_no_retain(bucket, dp_group, numel_per_bucket, dp_world_size)  # type: ignore[misc]


def single_member_scale(ds_engine: Any, dp_world_size: float) -> float:
    """The factor DeepSpeed's ``allreduce_bucket`` applies to a gradient when its group has one member.

    ``dp_world_size`` is the divisor DeepSpeed passes: the data-parallel size, also for expert
    gradients reduced over a smaller expert-data-parallel group (moe_bridge's module docstring).
    """
    if not ds_engine.gradient_average:
        return 1.0
    if ds_engine.postscale_gradients():
        pre = ds_engine.gradient_predivide_factor()
        return (1.0 / pre if pre != 1.0 else 1.0) * (pre / dp_world_size if pre != dp_world_size else 1.0)
    return 1.0 / dp_world_size


class ExpertAwareEngine(_ExpertAware, DeepSpeedEngine):
    """DeepSpeedEngine that reduces tagged expert gradients over hpframe's expert-data-parallel group."""


class ExpertAwarePipelineEngine(_ExpertAware, PipelineEngine):
    """PipelineEngine that reduces tagged expert gradients over hpframe's expert-data-parallel group."""


def release_expert_groups(plan: Any) -> None:
    """Forget the expert groups ``register_expert_groups`` registered (before building another engine)."""
    if plan.experts is None or plan.ep == 1:
        return
    name = expert_group_name(plan.ep)
    for registry in (
        ds_groups._EXPERT_PARALLEL_GROUP,
        ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP,
        ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
    ):
        registry.pop(name, None)
