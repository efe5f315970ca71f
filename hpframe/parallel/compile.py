"""``train.compile``: torch.compile the parts of each block whose shapes never change.

Compiled: each block's attention half (attn_norm, the attention module with its projections, rotary and
SDPA, the residual add and mlp_norm, as one graph), the dense MLPs, the final norm and, with tp = 1, the
cross-entropy loss (``compiled_cross_entropy``, used by the engine). Left eager: the MoE layers, whose
token counts per expert change every step (data-dependent shapes recompile or graph-break; their GPU
path is already a grouped GEMM with fused kernels).

With tp > 1 the attention modules carry TP communication in their hooks; they stay eager there and
only the norms and dense MLPs are compiled (a warning says so).

``nn.Module.compile`` compiles in place; the attention half is compiled as a bound method stored on the
block instance. Either way parameter names, state dicts and checkpoints are unchanged.

Measured on one H200 (docs/performance.md, bench/train_e2e.py): compiling norms + attention + loss
took a 3.58 B Mixtral-like model from 45% to 54% MFU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hpframe.logging import get_logger
from hpframe.models.layers import MLP

log = get_logger(__name__)


def apply_compile(model: nn.Module, *, tp: int) -> list[str]:
    """Compile the fixed-shape parts of ``model`` in place; return their names.

    tp == 1: each block's ``attention_half`` (attn_norm, attention, the residual add, mlp_norm) as one
    graph, so the residual adds and norms fuse forward and backward. tp > 1: the norms one by one
    (attention stays eager, its TP hooks communicate). Always: dense MLPs and the final norm.
    """
    compiled: list[str] = []
    for i, block in enumerate(model.layers):
        if tp == 1:
            # an instance attribute shadows the method; the block's parameters stay where they are
            block.attention_half = torch.compile(block.attention_half)
            compiled.append(f"layers.{i}.attention_half")
            parts: dict[str, nn.Module] = {}
        else:
            parts = {"attn_norm": block.attn_norm, "mlp_norm": block.mlp_norm}
        if isinstance(block.mlp, MLP):  # MoE layers stay eager (data-dependent shapes)
            parts["mlp"] = block.mlp
        for name, module in parts.items():
            module.compile()
            compiled.append(f"layers.{i}.{name}")
    model.norm.compile()
    compiled.append("norm")
    if tp > 1:
        log.warning("train.compile with parallel.tp>1: attention stays eager (its TP hooks communicate); "
                    "norms and dense MLPs are compiled")
    return compiled


def _cross_entropy_mean(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean fp32 token cross-entropy of full-vocabulary logits [..., V] (``vocab_parallel_cross_entropy``
    with tp = 1); compiled, the fp32 upcast and the log-softmax fuse instead of materializing [..., V] fp32."""
    total = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index,
                            reduction="sum")
    return total / (targets != ignore_index).sum().clamp_min(1)


def compiled_cross_entropy() -> Callable[..., torch.Tensor]:
    """The training loss for tp = 1 under ``train.compile`` (the engine calls it instead of the eager one)."""
    return torch.compile(_cross_entropy_mean)


def compiled_modules(model: nn.Module) -> list[str]:
    """Names of the parts that ``apply_compile`` compiled (for logs and tests)."""
    names = [n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    for i, block in enumerate(getattr(model, "layers", [])):
        if hasattr(block.__dict__.get("attention_half"), "_torchdynamo_orig_callable"):
            names.append(f"layers.{i}.attention_half")
    return names
