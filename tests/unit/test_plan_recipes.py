"""Every recipe plans on its default cluster within device memory, the full-scale ones match their
published sizes, and the debug recipes plan on the cpu cluster under dp/ep/tp/pp variations. No processes."""

from __future__ import annotations

import pytest

from hpframe.config.store import recipe_names
from hpframe.plan import make_plan

FULL_SCALE = {
    # recipe: (cluster, world size, total params in billions, active in billions)
    "mixtral_8x7b": ("h200x64", 64, 46.7, 12.9),
    "mixtral_8x22b": ("h200x64", 64, 140.6, 39.2),
    "deepseek_v3": ("h800x2048", 2048, 671.0, 37.6),
    "gpt3_175b": ("h100x1024", 1024, 174.6, 174.6),
    "mixtral_h200": ("h200x1", 1, 3.6, 1.1),
    "deepseek_h200": ("h200x1", 1, 4.3, 0.8),
}
DEBUG = ["mixtral_debug", "deepseek_debug", "gpt_debug"]


def test_recipe_list_is_covered() -> None:
    assert sorted(recipe_names()) == sorted([*FULL_SCALE, *DEBUG])


@pytest.mark.parametrize("recipe", sorted(FULL_SCALE))
def test_full_scale_recipe_plans_on_its_cluster(compose_cfg, recipe: str) -> None:
    cluster, world, total_b, active_b = FULL_SCALE[recipe]
    cfg = compose_cfg(f"recipe={recipe}")
    plan = make_plan(cfg)  # plan.memory_check defaults to true: an over-full GPU would raise
    assert cfg.cluster.name == cluster and plan.world_size == world
    assert plan.memory.total <= plan.memory.device_bytes
    assert round(plan.params.total / 1e9, 1) == total_b and round(plan.params.active / 1e9, 1) == active_b
    assert not [w for w in plan.warnings if "OUT OF MEMORY" in w]
    assert plan.checkpoint.interval_steps >= 1 and plan.time.step_seconds > 0


VARIATIONS = [
    [],
    ["parallel.dp=2"],
    ["parallel.tp=2"],
    ["parallel.pp=2"],
    ["parallel.pp=4"],
    ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2"],
    ["parallel.dp=4", "parallel.zero_stage=2"],
    ["parallel.dp=2", "parallel.zero_stage=1", "parallel.axis_order=tp-pp-dp"],
]
MOE_VARIATIONS = [["parallel.dp=2", "parallel.ep=2"], ["parallel.dp=4", "parallel.ep=4", "parallel.zero_stage=1"],
                  ["parallel=tp2_pp2_dp2"], ["parallel.dp=4", "parallel.ep=2", "parallel.pp=2"]]


@pytest.mark.parametrize("recipe", DEBUG)
@pytest.mark.parametrize("overrides", VARIATIONS + MOE_VARIATIONS, ids=lambda o: "_".join(o) or "single")
def test_debug_recipes_plan_on_cpu(compose_cfg, recipe: str, overrides: list[str]) -> None:
    cfg = compose_cfg(f"recipe={recipe}", *overrides)
    plan = make_plan(cfg)
    assert cfg.cluster.name == "cpu"
    assert plan.world_size == plan.tp * plan.pp * plan.dp
    assert sorted(i for s in plan.pipeline.stages for i in s.layers) == list(range(cfg.model.num_layers))
    assert plan.memory.total < plan.memory.device_bytes
