"""register_configs(): the only place that talks to Hydra's ConfigStore.

Schemas are stored as ``<group>/schema`` entries that every YAML of that group names in its
defaults list, plus the root ``run_schema``. Recipes live as plain YAML files in ``hpframe/recipes/``
(outside the Hydra config tree, so they read as documents); they are loaded here and stored in
the ``recipe`` group with package ``_global_``, so ``recipe=NAME`` selects one.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from hpframe.config import schema

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # hpframe/: the config tree ships inside the package
CONF_DIR = PACKAGE_DIR / "conf"
RECIPES_DIR = PACKAGE_DIR / "recipes"

GROUP_SCHEMAS = {
    "model": schema.ModelConfig,
    "moe": schema.MoEConfig,
    "parallel": schema.ParallelConfig,
    "train": schema.TrainConfig,
    "data": schema.DataConfig,
    "checkpoint": schema.CheckpointConfig,
    "cluster": schema.ClusterConfig,
    "plan": schema.PlanConfig,
}

_registered = False


def recipe_names(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    """Names accepted by ``recipe=NAME``."""
    return sorted(p.stem for p in recipes_dir.glob("*.yaml"))


def register_configs(recipes_dir: Path = RECIPES_DIR) -> None:
    """Store every schema and every recipe in the ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=schema.RunConfig)
    for group, cls in GROUP_SCHEMAS.items():
        cs.store(group=group, name="schema", node=cls)
    for path in sorted(recipes_dir.glob("*.yaml")):
        node = OmegaConf.load(path)
        cs.store(group="recipe", name=path.stem, node=node, package="_global_")
    _registered = True
