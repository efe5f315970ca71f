"""Tensor parallelism (tp=2, 2 gloo processes) against the single-process model, on CPU in fp32.

Compared: per-rank loss (vocab-parallel cross-entropy + aux loss), the logits gathered over the
vocabulary shards, and the gradient of every parameter gathered back to full shape, with the
unsharded model on the same micro-batch. Models: gpt_debug (dense, tied embeddings), mixtral_debug
(GQA + MoE kept replicated over TP) and deepseek_debug (MLA + shared experts), each with and without
sequence parallelism; Mixtral also under full and selective activation recomputation. In the same
launch, vocab_parallel_cross_entropy on vocabulary halves against F.cross_entropy on the full logits
(ignored targets; fp32 and bf16, whose gradient keeps the logits' dtype).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from _equivalence import case, check, worker
from hpframe.testing.distributed import run_distributed

TP2 = ["parallel.tp=2", "parallel.dp=1"]


def _vocab_ce_check(rank: int) -> dict[str, tuple[float, float, str]]:
    """vocab_parallel_cross_entropy on this rank's half of the vocabulary vs F.cross_entropy on all of it,
    with ignored targets, in fp32 and bf16: (loss error, max gradient error, gradient dtype)."""
    from hpframe.parallel import vocab_parallel_cross_entropy

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gen = torch.Generator().manual_seed(5)
        full = (3 * torch.randn(2, 9, 64, generator=gen)).to(dtype)
        targets = torch.randint(0, 64, (2, 9), generator=gen)
        targets[1, 4:] = -100
        ref_logits = full.float().clone().requires_grad_()
        ref = F.cross_entropy(ref_logits.flatten(0, 1), targets.flatten())
        ref.backward()
        local = full.detach()[..., rank * 32 : (rank + 1) * 32].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, targets, dist.group.WORLD)
        loss.backward()
        grad_err = (local.grad.float() - ref_logits.grad[..., rank * 32 : (rank + 1) * 32]).abs().max().item()
        out[name] = (abs(loss.item() - ref.item()), grad_err, "fp32" if local.grad.dtype == torch.float32 else "bf16")
    return out


def _tp_worker(rank: int, world_size: int, cases: list[Any]) -> list[Any]:
    return [*worker(rank, world_size, cases), _vocab_ce_check(rank)]


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_tp2_matches_single_process() -> None:
    cases = [
        case("gpt", "gpt_debug", 2, TP2),
        case("gpt_sp", "gpt_debug", 2, TP2, sequence_parallel=True),
        case("mixtral", "mixtral_debug", 2, TP2),
        case("mixtral_sp", "mixtral_debug", 2, TP2, sequence_parallel=True),
        case("mixtral_full_recompute", "mixtral_debug", 2, TP2, recompute="full"),
        case("mixtral_selective_sp", "mixtral_debug", 2, TP2, sequence_parallel=True, recompute="selective"),
        case("deepseek", "deepseek_debug", 2, TP2),
        case("deepseek_sp_capacity", "deepseek_debug", 2, [*TP2, "moe.dropless=false"], sequence_parallel=True),
        case("deepseek_q_full_rank", "deepseek_debug", 2, [*TP2, "model.q_lora_rank=0"]),
    ]
    results = run_distributed(_tp_worker, 2, (cases,), timeout=240)
    ce = [r.pop() for r in results]
    check(results)
    for per_dtype in ce:
        for dtype, (loss_err, grad_err, grad_dtype) in per_dtype.items():
            tol = 1e-6 if dtype == "fp32" else 1e-2
            assert loss_err <= tol and grad_err <= tol and grad_dtype == dtype, (dtype, loss_err, grad_err, grad_dtype)
    # TP shards really are halves: the embedding shard has V/2 rows on each rank.
    for r in results[0]:
        shapes = r["shapes"]
        assert shapes["embed.weight"][0][0] * 2 == shapes["embed.weight"][1][0], shapes["embed.weight"]
