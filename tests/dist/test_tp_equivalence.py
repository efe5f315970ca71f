"""Tensor parallelism (tp=2, 2 gloo processes) against the single-process model, on CPU in fp32.

Compared: per-rank loss (vocab-parallel cross-entropy + aux loss), the logits gathered over the
vocabulary shards, and the gradient of every parameter gathered back to full shape, with the
unsharded model on the same micro-batch. Models: gpt_debug (dense, tied embeddings), mixtral_debug
(GQA + MoE kept replicated over TP) and deepseek_debug (MLA + shared experts), each with and without
sequence parallelism; Mixtral also under full and selective activation recomputation.
"""

from __future__ import annotations

import pytest

from _equivalence import case, check, worker
from hpframe.testing.distributed import run_distributed

TP2 = ["parallel.tp=2", "parallel.dp=1"]


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
    results = run_distributed(worker, 2, (cases,), timeout=240)
    check(results)
    # TP shards really are halves: the embedding shard has V/2 rows on each rank.
    for r in results[0]:
        shapes = r["shapes"]
        assert shapes["embed.weight"][0][0] * 2 == shapes["embed.weight"][1][0], shapes["embed.weight"]
