"""DictConfig (as Hydra composed it) -> typed RunConfig. Types only; cross-checks belong to the planner."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from hpframe.config.errors import check_known_keys
from hpframe.config.schema import RunConfig
from hpframe.errors import UserError


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Convert a composed config to a RunConfig object.

    Raises UserError for a key no schema declares (``+parallel.tpp=2``) or a required value left unset."""
    from omegaconf.errors import MissingMandatoryValue

    check_known_keys(cfg)
    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        raise UserError(f"{err.full_key}: a value is required (set {err.full_key}=...)", key=str(err.full_key)) from err
    if not isinstance(obj, RunConfig):
        raise TypeError(f"composed config is {type(obj).__name__}, expected RunConfig (is run_schema in the defaults?)")
    return obj


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain-container form of a RunConfig, enums as their string values (for JSON and checkpoints)."""
    node = OmegaConf.structured(cfg)
    out = OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    assert isinstance(out, dict)
    return out


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from ``to_dict`` output (e.g. a checkpoint's stored config)."""
    node = OmegaConf.merge(OmegaConf.structured(RunConfig), data)
    obj = OmegaConf.to_object(node)
    assert isinstance(obj, RunConfig)
    return obj
