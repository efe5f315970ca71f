"""parallelize(model, plan, groups): apply the plan's parallelism to a model, in a fixed order.

  1. tensor parallelism   (plan.tp > 1)        tensor.apply_tp
  2. expert parallelism   (plan.ep > 1, MoE)   expert.apply_ep
  3. activation ckpt      (recompute != none)  act_ckpt.apply_activation_checkpointing
  4. torch.compile        (train.compile)      compile.apply_compile

The input is a MATERIALIZED full single-device model, built and ``init_weights(seed)``-ed identically
on every rank; each step slices weights in place (copies of this rank's shards, after which the full
tensors are freed). The sharded model therefore equals the single-device model exactly, which the
equivalence tests check. Do not call ``init_weights`` afterwards: TP shards are not nn.Linear and
keep their values. Building huge models on the meta device and initializing only the local shards is
a follow-up (the models' per-name, per-expert seeding already allows it).

Pipeline parallelism (keeping only this stage's blocks) and ZeRO belong to the engine, which calls
this function first.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hpframe.config.schema import Recompute
from hpframe.parallel.act_ckpt import apply_activation_checkpointing
from hpframe.parallel.compile import apply_compile
from hpframe.parallel.expert import apply_ep
from hpframe.parallel.groups import ParallelGroups
from hpframe.parallel.tensor import apply_tp


def _check_groups(plan: Any, groups: ParallelGroups) -> None:
    for axis, degree in (("tp", plan.tp), ("ep", plan.ep)):
        if groups.size(axis) != degree:
            raise ValueError(f"the {axis} group has {groups.size(axis)} ranks but the plan says parallel.{axis}={degree}")


def parallelize(
    model: nn.Module,
    plan: Any,
    groups: ParallelGroups,
    *,
    sequence_parallel: bool = False,
    recompute: Recompute | str = Recompute.none,
    compile: bool = False,
    ep_overlap: bool = True,
) -> nn.Module:
    """Apply TP, then EP, then activation checkpointing to ``model`` (in place); return it.

    ``sequence_parallel``, ``recompute`` and ``ep_overlap`` come from ``cfg.parallel``, ``compile`` from ``cfg.train``
    (the plan carries degrees only).
    """
    _check_groups(plan, groups)
    if plan.tp > 1:
        apply_tp(model, groups.tp, sequence_parallel=sequence_parallel)
    if plan.ep > 1 and plan.experts is not None:  # ep > 1 on a dense model: the planner warned, nothing to split
        apply_ep(model, plan, groups, overlap=ep_overlap)
    if Recompute(recompute) != Recompute.none:
        apply_activation_checkpointing(model, recompute)
    if compile:
        apply_compile(model, tp=plan.tp)
    return model
