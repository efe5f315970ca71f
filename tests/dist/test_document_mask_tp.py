"""data.document_mask under tensor parallelism (tp=2, sequence parallel, 2 gloo processes, fp32 CPU).

Each rank builds the full model, keeps an unsharded copy, shards the other with ``parallelize`` (tp=2,
sequence parallelism, selective recompute) and runs a packed batch of three documents per row with
``document_positions``. The logits gathered over the vocabulary shards must equal, token by token
(1e-5 of their scale), the unsharded model's logits of each document run alone. GQA (mixtral_debug)
and MLA (deepseek_debug), MoE blocks in both.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist

from _equivalence import compose_run_config
from hpframe.testing.distributed import run_distributed

EOS = 3


def _worker(rank: int, world_size: int, cfgs: list[Any]) -> list[float]:
    from hpframe.data.packing import document_positions
    from hpframe.models import build_model
    from hpframe.parallel import build_groups, parallelize
    from hpframe.plan import make_plan

    errors = []
    for cfg in cfgs:
        plan = make_plan(cfg, world_size)
        groups = build_groups(plan)
        ref = build_model(cfg.model, cfg.moe)
        ref.init_weights(cfg.train.seed)
        model = parallelize(copy.deepcopy(ref), plan, groups, sequence_parallel=True, recompute="selective")
        gen = torch.Generator().manual_seed(0)
        rows, docs = [], []
        for _ in range(2):
            row = []
            for n in (5, 7, 4):  # 16 tokens: seq_len divisible by tp for sequence parallelism
                d = torch.randint(EOS + 1, cfg.model.vocab_size, (n,), generator=gen)
                d[-1] = EOS
                row.append(d)
            rows.append(torch.cat(row))
            docs.append(row)
        tokens = torch.stack(rows)
        with torch.no_grad():
            local = model(tokens, document_positions(tokens, EOS))  # [B,S,V/tp]
            parts = [torch.empty_like(local) for _ in range(world_size)]
            dist.all_gather(parts, local.contiguous(), group=groups.tp)
            full = torch.cat(parts, dim=-1)
            alone = torch.stack([torch.cat([ref(d[None])[0] for d in row]) for row in docs])
        errors.append((full - alone).abs().max().item() / alone.abs().max().item())
    return errors


@pytest.mark.dist
@pytest.mark.timeout(200)
def test_tp2_packed_logits_equal_separate_documents() -> None:
    cfgs = [compose_run_config(r, ["parallel.tp=2", "parallel.dp=1"]) for r in ("mixtral_debug", "deepseek_debug")]
    results = run_distributed(_worker, 2, (cfgs,), timeout=180)
    for per_rank in results:
        assert all(err <= 1e-5 for err in per_rank), per_rank
