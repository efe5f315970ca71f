"""Pipeline parallelism: the hpframe Transformer as a DeepSpeed PipelineModule with the plan's partition.

Layer list (index: module), built from the modules of an already parallelized full model:
  0            EmbedStage   tokens[B,S] -> (x[B,S,H], aux[1])
  1..L         BlockStage   (x, aux) -> (block(x), aux + block's MoE aux loss)
  L+1          HeadStage    (x, aux) -> (logits[B,S,V/tp], aux)       final norm + LM head
and the loss ``PipelineLoss((logits, aux), targets) = LM cross-entropy + aux``, on the last stage.
With ``data.document_mask`` the first stage takes ``(tokens, positions)`` and every stage passes the
int64 ``positions[B,S]`` on after ``(x, aux)`` (DeepSpeed sends integer activations and expects no
gradient for them), so each block masks attention by document whatever stage runs it.

Auxiliary losses: a running fp32 tensor ``aux[1]`` travels between stages with the hidden states, so
the loss of one micro-batch is LM + the sum of every MoE layer's aux loss, whatever the number of
stages, and its gradient (1) flows back to every stage's routers through the p2p gradients.
DeepSpeed's pipeline backward needs every floating output of a stage to have a graph, so the
embedding stage seeds ``aux`` as ``0 * x[0,0,0]``, which adds exact zeros to one gradient entry.

Stage boundaries come from ``plan.pipeline.stages`` (``PlanPipelineModule._partition_layers``):
stage s runs its blocks, the first stage also the embedding, the last the norm and head.

Tied embeddings (``model.tie_embeddings``) with pp > 1: the first and last stage each hold a copy of
the embedding matrix (equal at start, since the full model is initialized identically everywhere);
the last stage's head multiplies by its copy; their gradients are summed over the plan's
``embedding`` group (first and last stage of one dp/tp column) before the data-parallel reduction,
through DeepSpeed's tied-weight hook, so both copies take identical optimizer steps. The engine's
gradient norm counts that matrix on the first stage only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.runtime.pipe.module import PipelineModule
from torch import nn

from hpframe.models.moe import MoE
from hpframe.models.transformer import mask_padded_vocab
from hpframe.parallel.tensor import vocab_parallel_cross_entropy


class EmbedStage(nn.Module):
    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed

    def forward(self, inputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        tokens, *positions = inputs if isinstance(inputs, tuple) else (inputs,)
        x = self.embed(tokens)  # [B,S,H]
        aux = x.reshape(-1)[:1].float() * 0.0  # [1], zero, but part of the graph
        return (x, aux, *positions)


class BlockStage(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, aux, *positions = inputs
        x = self.block(x, *positions)
        mlp = self.block.mlp
        if isinstance(mlp, MoE):
            aux = aux + mlp.aux_loss.float().reshape(1)
        return (x, aux, *positions)


class HeadStage(nn.Module):
    """Final norm and LM head; ``tied`` = the embedding module whose weight is the head (tied embeddings)."""

    def __init__(self, norm: nn.Module, head: nn.Module | None, tied: nn.Module | None, vocab_size: int) -> None:
        super().__init__()
        assert (head is None) != (tied is None)
        self.norm, self.head, self.tied = norm, head, tied
        self.vocab_size = vocab_size

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        x, aux = inputs[:2]
        x = self.norm(x)
        logits = self.head(x) if self.head is not None else F.linear(x, self.tied.weight)
        start = getattr(self.head if self.head is not None else self.tied, "vocab_start", 0)
        return mask_padded_vocab(logits, self.vocab_size, start), aux


class PipelineLoss:
    """LM cross-entropy (vocab-parallel over tp) + the running aux loss; records both per micro-batch."""

    def __init__(self, tp_group: Any) -> None:
        self.tp_group = tp_group
        self.lm: list[torch.Tensor] = []
        self.aux: list[torch.Tensor] = []
        self.on_record: Any = None  # optional callback receiving each micro-batch's detached loss

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        logits, aux = outputs
        lm = vocab_parallel_cross_entropy(logits, targets, self.tp_group)
        aux = aux.sum()
        self.lm.append(lm.detach().float())
        self.aux.append(aux.detach().float())
        loss = lm + aux
        if self.on_record is not None:
            self.on_record(loss.detach())
        return loss

    def pop(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The recorded (lm, aux) per micro-batch since the last pop."""
        out = (self.lm, self.aux)
        self.lm, self.aux = [], []
        return out


def stage_layers(model: nn.Module) -> list[nn.Module]:
    """The flat layer list: embedding, one entry per block, norm + head."""
    tied = model.embed if model.head is None else None
    return [EmbedStage(model.embed), *(BlockStage(b) for b in model.layers), HeadStage(model.norm, model.head, tied, model.vocab_size)]


def plan_parts(plan: Any) -> list[int]:
    """Layer-list boundaries of each stage (DeepSpeed's ``parts``: stage s owns [parts[s], parts[s+1]))."""
    stages = plan.pipeline.stages
    expected = 0
    for s in stages:
        if tuple(s.layers) != tuple(range(expected, expected + len(s.layers))) or not s.layers:
            raise ValueError(f"pipeline stage {s.index} blocks {s.layers} are not the next contiguous run after {expected}")
        expected += len(s.layers)
    if not (stages[0].has_embedding and stages[-1].has_head):
        raise ValueError("the plan must put the embedding on the first stage and the head on the last")
    parts = [0]
    for s in stages:
        parts.append(parts[-1] + len(s.layers) + (1 if s.index == 0 else 0))
    parts[-1] += 1  # the head closes the last stage
    return parts


class PlanPipelineModule(PipelineModule):
    """PipelineModule whose partition is the plan's (DeepSpeed's own partitioners are bypassed)."""

    def __init__(self, model: nn.Module, plan: Any, groups: Any, topology: Any, loss_fn: PipelineLoss) -> None:
        self._plan_parts = plan_parts(plan)
        self._embedding_group = groups.embedding if (plan.pp > 1 and model.head is None) else None
        # a tuple, not an attribute holding the Parameter: nn.Module would register it (and too early)
        self._tied = (model.embed.weight,) if self._embedding_group is not None else ()
        super().__init__(
            layers=stage_layers(model),
            topology=topology,
            loss_fn=loss_fn,
            partition_method="uniform",
            activation_checkpoint_interval=0,
        )
        self.is_first_stage = self.stage_id == 0
        self.is_last_stage = self.stage_id == plan.pp - 1

    def _partition_layers(self, method: str = "uniform") -> None:
        self.parts = list(self._plan_parts)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    def get_tied_weights_and_groups(self) -> list[tuple[torch.Tensor, Any]]:
        """The tied embedding matrix and the plan's embedding group, on the first and last stage."""
        if self._embedding_group is None or not (self.is_first_stage or self.is_last_stage):
            return []
        return [(self._tied[0], self._embedding_group)]

    def allreduce_tied_weight_gradients(self) -> None:
        import torch.distributed as dist

        for weight, group in self.get_tied_weights_and_groups():
            if weight.grad is not None:
                dist.all_reduce(weight.grad, group=group)

    def tied_weight_duplicate(self) -> torch.Tensor | None:
        """The tied matrix when this rank holds the second copy (last stage): skip it in norms."""
        if self._embedding_group is not None and self.is_last_stage and not self.is_first_stage:
            return self._tied[0]
        return None
