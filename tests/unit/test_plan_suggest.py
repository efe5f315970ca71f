"""plan.suggest: every suggested layout is a valid plan on the same world that fits memory, at the same
global batch, listed fastest first; compared with make_plan run on each suggestion. No processes."""

from __future__ import annotations

import json

from hpframe.plan import make_plan
from hpframe.plan.report import render_json
from hpframe.plan.suggest import suggest_layouts


def test_suggestions_are_valid_plans_sorted_by_step_time(compose_cfg) -> None:
    cfg = compose_cfg("recipe=mixtral_debug", "parallel.dp=4")
    plan = make_plan(cfg)
    out = suggest_layouts(cfg, plan, limit=50)
    assert out and [s.step_seconds for s in out] == sorted(s.step_seconds for s in out)
    assert {(s.tp, s.pp, s.ep) for s in out} >= {(1, 1, 1), (1, 1, 2), (1, 1, 4), (1, 2, 2), (2, 1, 2), (1, 4, 1)}
    for s in out:
        c = compose_cfg("recipe=mixtral_debug", f"parallel.tp={s.tp}", f"parallel.pp={s.pp}", f"parallel.dp={s.dp}",
                        f"parallel.ep={s.ep}", f"parallel.zero_stage={s.zero_stage}", f"parallel.recompute={s.recompute}",
                        f"parallel.global_batch_size={plan.global_batch_size}")
        p = make_plan(c)
        assert p.world_size == 4 and p.global_batch_size == plan.global_batch_size
        assert p.memory.total == s.memory_bytes <= p.memory.device_bytes
        assert p.time.step_seconds == s.step_seconds


def test_json_carries_suggestions(compose_cfg) -> None:
    cfg = compose_cfg("recipe=gpt_debug", "parallel.dp=2", "plan.suggest=true")
    doc = json.loads(render_json(make_plan(cfg), cfg))
    assert {(s["tp"], s["pp"], s["dp"]) for s in doc["suggestions"]} == {(1, 1, 2), (2, 1, 1), (1, 2, 1)}


def test_bf16_suggestions_respect_the_precision_path(compose_cfg) -> None:
    """bf16 with fp32 master weights needs ZeRO >= 1 (also at dp = 1): no suggestion may use ZeRO 0, and
    the tp2 / pp2 layouts (dp = 1) are still offered, with ZeRO 1. With bf16 master weights ZeRO 0 is fine."""
    cfg = compose_cfg("recipe=mixtral_h200", "cluster.gpus_per_node=2")
    out = suggest_layouts(cfg, make_plan(cfg), limit=50)
    assert out and all(s.zero_stage >= 1 for s in out)
    assert {(s.tp, s.pp) for s in out} >= {(2, 1), (1, 2)}
    pure = compose_cfg("recipe=mixtral_h200", "cluster.gpus_per_node=2", "train.master_dtype=bf16")
    assert any(s.zero_stage == 0 for s in suggest_layouts(pure, make_plan(pure), limit=50))
