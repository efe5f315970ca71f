"""Activation checkpointing (``parallel.recompute``): none, selective, full.

  full       every transformer block's forward is recomputed in backward (only block inputs are kept).
             Communication inside a block (TP all-reduces, EP all-to-alls) runs again in backward, on
             every rank in the same order, as in Megatron's full recompute.
  selective  the attention core and the routed experts' activations are recomputed:
             - attention: the attention module's forward runs under selective checkpointing that keeps
               the outputs of its matmuls (q/k/v/o projections) and recomputes everything else
               (rotary, softmax, the attention kernel and its large intermediates). TP communication
               sits in module hooks outside that forward, so nothing is communicated twice.
             - experts: only the local expert computation (the [N, Fe] intermediates) is recomputed;
               under EP the all-to-alls stay outside the checkpointed region.

Checkpointing replaces the ``forward`` of a module INSTANCE (non-reentrant ``torch.utils.checkpoint``),
so parameter names and state dicts are unchanged. The router's ``load_accum`` counts tokens only
outside the backward pass, so a recomputed forward does not count them twice.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from hpframe.config.schema import Recompute
from hpframe.models.moe import GroupedExperts
from hpframe.parallel.expert import ExpertParallelExperts

# Ops whose outputs selective checkpointing keeps: the projections (cheap to keep, costly to redo).
_SAVE_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_module(module: nn.Module, *, keep_matmuls: bool = False) -> nn.Module:
    """Make ``module``'s forward recompute in backward (its hooks stay outside the checkpoint)."""
    inner: Callable[..., Any] = module.forward
    context_fn = functools.partial(create_selective_checkpoint_contexts, _save_matmuls) if keep_matmuls else None

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        if context_fn is None:
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    module.forward = forward  # type: ignore[method-assign]
    module.recompute = "selective" if keep_matmuls else "full"  # type: ignore[assignment]
    return module


def apply_activation_checkpointing(model: nn.Module, recompute: Recompute | str) -> nn.Module:
    """Apply ``recompute`` (none, selective, full) to every block of ``model`` (in place)."""
    mode = Recompute(recompute)
    if mode == Recompute.none:
        return model
    for block in model.layers:
        if mode == Recompute.full:
            checkpoint_module(block)
            continue
        checkpoint_module(block.attn, keep_matmuls=True)
        experts = getattr(block.mlp, "experts", None)
        if isinstance(experts, ExpertParallelExperts):
            experts.checkpoint_compute = True  # recompute the local experts, not the all-to-alls
        elif isinstance(experts, GroupedExperts):
            checkpoint_module(experts)
    return model
