"""Pipeline partition: balanced splits equal a brute-force optimum, uneven splits keep every block,
manual layouts are taken as given. No processes."""

from __future__ import annotations

import itertools
import random

import pytest

from hpframe.plan import PlanError, make_plan
from hpframe.plan.pipeline import balance, stage_costs


def brute_force_best(costs: list[float], pp: int, first: float, last: float) -> float:
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations(range(1, n), pp - 1):
        bounds = (0, *cuts, n)
        stage = [sum(costs[bounds[s]:bounds[s + 1]]) for s in range(pp)]
        stage[0] += first
        stage[-1] += last
        best = min(best, max(stage))
    return best


def test_uniform_costs_split_evenly() -> None:
    assert balance((1.0,) * 8, 4) == (2, 2, 2, 2)
    assert balance((1.0,) * 8, 1) == (8,)
    assert balance((1.0,) * 8, 8) == (1,) * 8


@pytest.mark.parametrize("seed", range(12))
def test_balance_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(3, 10)
    pp = rng.randint(1, n)
    costs = [rng.choice([1.0, 1.0, 3.0]) * rng.uniform(0.8, 1.2) for _ in range(n)]
    first, last = rng.uniform(0, 2), rng.uniform(0, 2)
    sizes = balance(tuple(costs), pp, first_extra=first, last_extra=last)
    assert len(sizes) == pp and sum(sizes) == n and min(sizes) >= 1
    bounds = [0, *itertools.accumulate(sizes)]
    stage = [sum(costs[bounds[s]:bounds[s + 1]]) for s in range(pp)]
    stage[0] += first
    stage[-1] += last
    assert max(stage) == pytest.approx(brute_force_best(costs, pp, first, last))


def test_heavy_head_moves_blocks_off_last_stage() -> None:
    # 6 equal blocks, head worth 2 blocks: last stage gets 1 block (1 + 2 = 3), others share 5
    assert balance((1.0,) * 6, 3, last_extra=2.0)[-1] == 1


def test_uneven_layers_keep_every_block(compose_cfg) -> None:
    plan = make_plan(compose_cfg("recipe=deepseek_v3"))  # 61 blocks over 16 stages
    layers = [i for s in plan.pipeline.stages for i in s.layers]
    assert layers == list(range(61))
    assert len(plan.pipeline.stages) == 16 and min(plan.pipeline.layers_per_stage) >= 1
    assert plan.pipeline.stages[0].has_embedding and plan.pipeline.stages[-1].has_head
    assert plan.pipeline.stage_of_layer(60) == 15 and plan.pipeline.stage_of_layer(0) == 0


def test_dense_and_moe_blocks_weigh_differently(compose_cfg) -> None:
    # deepseek_debug: block 0 dense (ffn 384), blocks 1-3 MoE (4 of 16 experts of 96, plus 1 shared)
    cfg = compose_cfg("recipe=deepseek_debug", "parallel.pp=2", "cluster=h200x8", "parallel.dp=4")
    emb, blocks, head = stage_costs(cfg.model, cfg.moe, cfg.data.seq_len)
    # forward FLOPs per token, by hand: the dense MLP has 3*128*384 weights, the MoE MLP has a router
    # 128*16 and (4 routed + 1 shared) experts of 3*128*96
    assert blocks[1] - blocks[0] == 2 * (128 * 16 + 5 * 3 * 128 * 96 - 3 * 128 * 384)
    assert blocks[1] == blocks[2] == blocks[3]
    plan = make_plan(cfg)
    assert sum(plan.pipeline.layers_per_stage) == 4
    assert max(s.cost for s in plan.pipeline.stages) == pytest.approx(brute_force_best(list(blocks), 2, emb, head))


def test_manual_layout(compose_cfg) -> None:
    plan = make_plan(compose_cfg("recipe=mixtral_debug", "parallel.pp=2", "parallel.pipeline_layout=[3,1]"))
    assert plan.pipeline.manual
    assert [s.layers for s in plan.pipeline.stages] == [(0, 1, 2), (3,)]
    with pytest.raises(PlanError, match="summing to 5"):
        make_plan(compose_cfg("recipe=mixtral_debug", "parallel.pp=2", "parallel.pipeline_layout=[3,2]"))
