"""Parameter counts: the models hpframe builds against the planner's formula (make_plan(cfg).params),
component by component. Debug recipes are instantiated on the CPU; full-scale recipes are built on
the meta device (nothing allocated)."""

from __future__ import annotations

import pytest
import torch
from test_models_transformer import compose_run

from hpframe.config.store import recipe_names
from hpframe.models import build_model
from hpframe.plan import make_plan
from hpframe.plan.params import COMPONENTS


def component_of(name: str) -> str:
    """The planner's component for a parameter name of hpframe's Transformer."""
    if name == "embed.weight":
        return "embedding"
    if name == "head.weight":
        return "head"
    if name == "norm.weight" or name.endswith(("attn_norm.weight", "mlp_norm.weight")):
        return "norms"
    if ".attn." in name:
        return "attention"  # MLA latent norms included, as the planner counts them
    if ".mlp.router." in name:
        return "router"
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.shared." in name:
        return "shared_experts"
    assert ".mlp." in name, name
    return "mlp"


def counts_by_component(model: torch.nn.Module) -> dict[str, int]:
    out = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        out[component_of(name)] += p.numel()
    return out


DEBUG = [r for r in recipe_names() if r.endswith("_debug")]
FULL = [r for r in recipe_names() if not r.endswith("_debug")]


def test_recipe_lists_are_not_empty() -> None:
    assert {"mixtral_debug", "deepseek_debug", "gpt_debug"} <= set(DEBUG)
    assert {"mixtral_8x7b", "deepseek_v3"} <= set(FULL)


@pytest.mark.parametrize("recipe", DEBUG)
def test_debug_model_params_equal_plan(recipe: str) -> None:
    cfg = compose_run(f"recipe={recipe}")
    model = build_model(cfg.model, cfg.moe)
    model.init_weights(seed=0)
    plan = make_plan(cfg)
    assert plan.params is not None
    assert counts_by_component(model) == plan.params.by_component
    assert sum(p.numel() for p in model.parameters()) == plan.params.total


@pytest.mark.parametrize("recipe", FULL)
def test_full_scale_meta_model_params_equal_plan(recipe: str) -> None:
    cfg = compose_run(f"recipe={recipe}")
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe)
    plan = make_plan(cfg)
    assert plan.params is not None
    assert counts_by_component(model) == plan.params.by_component
    assert sum(p.numel() for p in model.parameters()) == plan.params.total
