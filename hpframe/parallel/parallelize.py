"""parallelize(model, plan, groups): apply the plan's parallelism to a model, in a fixed order.

  1. tensor parallelism   (plan.tp > 1)        tensor.apply_tp
  2. expert parallelism   (plan.ep > 1, MoE)   expert.apply_ep (moe.dispatch=tokens) or
                                               expert_fetch.apply_fetch (experts: plan.experts.dispatch)
  3. activation ckpt      (recompute != none)  act_ckpt.apply_activation_checkpointing
  4. torch.compile        (train.compile)      compile.apply_compile

The input is either
  * a MATERIALIZED full single-device model, built and ``init_weights(seed)``-ed identically on every
    rank; each step slices weights in place (copies of this rank's shards, after which the full
    tensors are freed); or
  * a model on the META device, with ``init_seed``: the parts this rank runs (its pipeline stage's
    blocks, the embedding on the first stage and with tied embeddings the last, the final norm and
    head on the last) are materialized and initialized ONE BLOCK AT A TIME, each sharded (TP, EP)
    before the next is built. No rank ever holds the full model: peak host memory is this rank's
    shards plus one full block, where the first form needs the whole model on every rank (187 GB
    in fp32 for Mixtral 8x7B, times the ranks of a node). Blocks of other stages stay on meta.
Both give identical shards (per-name, per-expert seeding; ``tests/dist/test_streamed_init.py``), so
the sharded model equals the single-device model exactly, which the equivalence tests check. Do not
call ``init_weights`` afterwards: TP shards are not nn.Linear and keep their values.

Pipeline parallelism (keeping only this stage's blocks) and ZeRO belong to the engine, which calls
this function first.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hpframe.config.schema import Recompute
from hpframe.parallel.act_ckpt import apply_activation_checkpointing
from hpframe.parallel.compile import apply_compile
from hpframe.parallel.expert import apply_ep, apply_ep_moe
from hpframe.parallel.expert_fetch import apply_fetch, apply_fetch_moe, build_fetch_groups, link_prefetch
from hpframe.parallel.groups import ParallelGroups
from hpframe.parallel.tensor import apply_tp, apply_tp_block, apply_tp_outer


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
    init_seed: int | None = None,
    device: str = "cpu",
    weights: Any = None,
) -> nn.Module:
    """Apply TP, then EP, then activation checkpointing to ``model`` (in place); return it.

    ``sequence_parallel``, ``recompute`` and ``ep_overlap`` come from ``cfg.parallel``, ``compile`` from ``cfg.train``
    (the plan carries degrees only). ``weights``: on a meta model, an ``hpframe.checkpoint.hf_load.HFCheckpoint``
    (already ``check``-ed) whose tensors fill this rank's shards instead of ``init_seed``'s random init.
    """
    _check_groups(plan, groups)
    if any(p.is_meta for p in model.parameters()):
        if init_seed is None and weights is None:
            raise ValueError("parallelize: a model on the meta device needs init_seed (train.seed) to be initialized")
        _stream_shards(model, plan, groups, seed=init_seed or 0, device=device, sequence_parallel=sequence_parallel,
                       ep_overlap=ep_overlap, weights=weights)
    else:
        if plan.tp > 1:
            apply_tp(model, groups.tp, sequence_parallel=sequence_parallel)
        if plan.ep > 1 and plan.experts is not None:  # ep > 1 on a dense model: the planner warned, nothing to split
            if plan.experts.dispatch == "experts":
                apply_fetch(model, plan, groups, overlap=ep_overlap)
            else:
                apply_ep(model, plan, groups, overlap=ep_overlap)
    if Recompute(recompute) != Recompute.none:
        apply_activation_checkpointing(model, recompute)
    if compile:
        apply_compile(model, tp=plan.tp)
    return model


def owned_parts(model: nn.Module, plan: Any, stage: int) -> tuple[list[str], list[int]]:
    """(outer parts, block indices) that pipeline stage ``stage`` runs: the embedding on the first
    stage (and on the last with tied embeddings), the final norm and head on the last, its blocks."""
    last = stage == plan.pp - 1
    tied = model.head is None
    outer = []
    if stage == 0 or (tied and last):
        outer.append("embed")
    if last:
        outer.append("norm")
        if not tied:
            outer.append("head")
    return outer, list(plan.pipeline.stages[stage].layers)


def _stream_shards(model: nn.Module, plan: Any, groups: ParallelGroups, *, seed: int, device: str,
                   sequence_parallel: bool, ep_overlap: bool, weights: Any = None) -> None:
    """Materialize, initialize and shard this rank's parts of a meta model, one block at a time.

    With ``weights`` the parts are sharded uninitialized (``to_empty`` memory is not touched until
    written, so the full block costs no resident memory) and each shard is then read from the files."""
    import torch.distributed as dist

    from hpframe.models import MoE

    coords = plan.ranks.coords(dist.get_rank())
    outer, blocks = owned_parts(model, plan, coords["pp"])
    for name in outer:
        getattr(model, name).to_empty(device=device)
    if weights is None:
        model.init_parts(seed, outer)
    if plan.tp > 1:
        apply_tp_outer(model, groups.tp, sequence_parallel=sequence_parallel, embed="embed" in outer,
                       head="head" in outer)
    if weights is not None:
        for name in outer:
            weights.load_into(getattr(model, name), name, tp_rank=coords["tp"])
    split_experts = plan.ep > 1 and plan.experts is not None
    fetch = build_fetch_groups(plan, groups) if split_experts and plan.experts.dispatch == "experts" else None
    for i in blocks:
        block = model.layers[i]
        block.to_empty(device=device)
        if weights is None:
            model.init_parts(seed, [f"layers.{i}"])
        if plan.tp > 1:
            apply_tp_block(block, groups.tp, sequence_parallel=sequence_parallel)
        if split_experts and isinstance(block.mlp, MoE):
            if fetch is not None:
                apply_fetch_moe(block.mlp, plan, groups, fetch, overlap=ep_overlap)
            else:
                apply_ep_moe(block.mlp, plan, groups, overlap=ep_overlap)
        if weights is not None:
            weights.load_into(block, f"layers.{i}", tp_rank=coords["tp"])
    if fetch is not None:
        link_prefetch(model, plan, groups.rank)
