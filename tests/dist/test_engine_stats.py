"""dropped_token_frac of a step covers every rank, micro-batch and MoE layer.

Two processes, mixtral_debug with dp2 = ep2 and a capacity small enough that tokens are dropped:
the engine's ``moe_stats["dropped_token_frac"]`` equals the mean of ``MoE.stats["dropped_frac"]`` over
all forwards of the single-process model on the same global batch (capacity is decided per forward
on the same micro-batch in both), and is identical on both ranks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hpframe.testing.distributed import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

OVERRIDES = ["recipe=mixtral_debug", "parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=1",
             "parallel.micro_batch_size=2", "parallel.grad_accum=2", "data.seq_len=16", "moe.dropless=false",
             "moe.capacity_factor=0.5", "moe.min_capacity=1"]


def _worker(rank: int, world: int) -> list[float]:
    from conftest import compose_run_config
    from engine_cases import build_rank_engine, rank_batches

    cfg = compose_run_config(*OVERRIDES)
    engine, plan, _ = build_rank_engine(cfg)
    return [engine.train_step(rank_batches(cfg, plan, rank, step)).moe_stats["dropped_token_frac"] for step in range(2)]


def _reference() -> float:
    """Mean dropped fraction of the first step's forwards in one process (before any update)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import compose_run_config
    from engine_cases import global_batches

    from hpframe.models import MoE, build_model

    cfg = compose_run_config(*OVERRIDES)
    model = build_model(cfg.model, cfg.moe)
    model.init_weights(cfg.train.seed)
    model.train()
    fracs = []
    for tokens, _ in global_batches(cfg, 2, 0):
        model(tokens)
        fracs += [float(m.stats["dropped_frac"]) for m in model.modules() if isinstance(m, MoE)]
    return sum(fracs) / len(fracs)


@pytest.mark.dist
@pytest.mark.timeout(200)
def test_dropped_token_frac_is_global() -> None:
    results = run_distributed(_worker, 2, timeout=180)
    assert results[0] == results[1]
    ref = _reference()
    assert ref > 0.05  # the capacity really drops tokens
    assert results[0][0] == pytest.approx(ref, rel=1e-6)
