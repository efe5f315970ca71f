"""Shared fixtures: compose a RunConfig the way launch.py does (schema + hpframe/conf/ + hpframe/recipes/ + overrides)."""

from __future__ import annotations

from typing import Callable

import pytest
from hydra import compose, initialize_config_dir

from hpframe.config.convert import to_run_config
from hpframe.config.schema import RunConfig
from hpframe.config.store import CONF_DIR, register_configs

ComposeFn = Callable[..., RunConfig]


def compose_run_config(*overrides: str) -> RunConfig:
    """RunConfig composed from hpframe/conf/config.yaml with Hydra-style ``key=value`` overrides."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=list(overrides)))


@pytest.fixture
def compose_cfg() -> ComposeFn:
    """``compose_cfg("recipe=mixtral_debug", "parallel.tp=2")`` -> RunConfig."""
    return compose_run_config
