"""One validation layer: the engine's and the model builder's refusals are the planner's (hpframe/plan/validate.py).

``build_model`` and ``plan.deepspeed_config`` call the planner's own check functions, so the same
configuration is refused with the same PlanError (key and message) by ``make_plan``, by the model
builder and by the DeepSpeed config writer. No processes.
"""

from __future__ import annotations

import dataclasses

import pytest

from hpframe.models import build_model
from hpframe.plan import PlanError, make_plan
from hpframe.plan.deepspeed_config import deepspeed_config


def test_model_build_checks_run_in_the_planner_and_the_builder(compose_cfg) -> None:
    cfg = compose_cfg("recipe=mixtral_debug", "moe.max_nodes_per_token=-1")
    with pytest.raises(PlanError) as planned:
        make_plan(cfg)
    with pytest.raises(PlanError) as built:
        build_model(cfg.model, cfg.moe)
    assert planned.value.key == "moe.max_nodes_per_token"
    assert "moe.max_nodes_per_token=-1 must be >= 0" in str(planned.value)
    assert (built.value.key, str(built.value)) == (planned.value.key, str(planned.value))


def test_capacity_factor_refused_by_planner_and_builder(compose_cfg) -> None:
    """Capacity dropping with a zero capacity: the planner's range check and the builder both refuse it."""
    cfg = compose_cfg("recipe=mixtral_debug", "moe.dropless=false", "moe.capacity_factor=0")
    with pytest.raises(PlanError) as planned:
        make_plan(cfg)
    with pytest.raises(PlanError, match=r"moe.capacity_factor=0.0 and moe.eval_capacity_factor=2.0 must be positive"
                                        " when moe.dropless is false") as built:
        build_model(cfg.model, cfg.moe)
    assert "moe.capacity_factor" in planned.value.key and "moe.capacity_factor" in built.value.key


def test_builder_refuses_routing_groups_that_do_not_divide_the_experts(compose_cfg) -> None:
    cfg = compose_cfg("recipe=deepseek_debug")
    with pytest.raises(PlanError, match=r"moe.num_experts=\d+ must be divisible by the routing groups \(3;") as err:
        build_model(cfg.model, cfg.moe, routing_groups=3)
    assert err.value.values["routing_groups"] == 3


def test_engine_refusal_is_the_planners(compose_cfg) -> None:
    """parallel.pp=2 with ZeRO 2: make_plan refuses; a plan of the same layout handed to the DeepSpeed
    config writer (as a hand-built plan would be) is refused with the same key and message."""
    cfg = compose_cfg("recipe=mixtral_debug", "parallel.pp=2", "parallel.zero_stage=2")
    with pytest.raises(PlanError) as planned:
        make_plan(cfg)
    ok = make_plan(compose_cfg("recipe=mixtral_debug", "parallel.pp=2", "parallel.zero_stage=1"))
    with pytest.raises(PlanError) as engine:
        deepspeed_config(dataclasses.replace(ok, zero_stage=2), dtype="fp32", device="cpu")
    assert (engine.value.key, str(engine.value)) == (planned.value.key, str(planned.value))
    assert "DeepSpeed's pipeline engine supports ZeRO stages 0 and 1 only" in str(engine.value)
