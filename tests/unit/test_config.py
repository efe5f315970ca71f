"""Every option of every config group, every recipe and every experiment composes under the schema
and converts to a RunConfig (and back through to_dict/from_dict); bad keys and types fail at compose
time. Compared: the composed values with the YAML files' own values. No processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

from hpframe.config.convert import from_dict, to_dict
from hpframe.config.schema import RunConfig
from hpframe.config.store import CONF_DIR, RECIPES_DIR, recipe_names

SKIP_GROUPS = {"hydra", "local"}
EXTRA = {("data", "tokenized"): ["data.path=/nonexistent/tokens"]}  # data.path is required (???) for tokenized


def group_options() -> list[tuple[str, str]]:
    out = []
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in SKIP_GROUPS):
        out += [(group.name, f.stem) for f in sorted(group.glob("*.yaml"))]
    return out


def _plain(path: Path) -> dict:
    node = OmegaConf.load(path)
    data = OmegaConf.to_container(node, resolve=False)
    assert isinstance(data, dict)
    data.pop("defaults", None)
    return data


@pytest.mark.parametrize("group,option", group_options(), ids=lambda x: str(x))
def test_group_option_composes_and_converts(compose_cfg, group: str, option: str) -> None:
    cfg = compose_cfg(f"{group}={option}", *EXTRA.get((group, option), []))
    assert isinstance(cfg, RunConfig)
    values = _plain(CONF_DIR / group / f"{option}.yaml")
    if group in ("experiment", "debug"):  # @package _global_: keys are top-level sections
        sections = values
    else:
        sections = {group: values}
    # the default recipe (composed after the group choices) wins where it sets the same key
    recipe = _plain(RECIPES_DIR / f"{cfg.recipe}.yaml") if group not in ("experiment", "debug") else {}
    for section, keys in sections.items():
        for key, value in keys.items():
            got = getattr(getattr(cfg, section), key)
            got = got.value if hasattr(got, "value") else got
            if value != "???" and key not in recipe.get(section, {}):
                assert got == value, (section, key)
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("recipe", recipe_names())
def test_recipe_composes_and_converts(compose_cfg, recipe: str) -> None:
    cfg = compose_cfg(f"recipe={recipe}")
    values = _plain(RECIPES_DIR / f"{recipe}.yaml")
    assert cfg.recipe == recipe
    for section in ("model", "moe", "parallel"):
        for key, value in values.get(section, {}).items():
            got = getattr(getattr(cfg, section), key)
            assert (got.value if hasattr(got, "value") else got) == value, (section, key)
    assert from_dict(to_dict(cfg)) == cfg


def test_experiment_overrides_group_choices(compose_cfg) -> None:
    cfg = compose_cfg("experiment=ep_demo")
    assert cfg.recipe == "mixtral_debug" and (cfg.parallel.dp, cfg.parallel.ep, cfg.parallel.zero_stage) == (4, 2, 1)


@pytest.mark.parametrize(
    "override,error",
    [("parallel.tpp=2", (ConfigAttributeError, ConfigKeyError)), ("parallel.tp=two", ValidationError),
     ("parallel.recompute=sometimes", ValidationError)],
)
def test_bad_keys_and_values_fail_at_compose(compose_cfg, override: str, error: type) -> None:
    with pytest.raises(Exception) as info:
        compose_cfg(override)
    # Hydra wraps the omegaconf error; the cause chain carries it
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    assert any(isinstance(e, error) for e in chain) or override.split("=")[0] in str(info.value)
