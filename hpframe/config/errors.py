"""Hydra/OmegaConf composition errors -> one line naming the key, with "did you mean ..." where close.

Hydra reports a misspelled key, a value of the wrong type or an unknown recipe as a multi-line
message with a hint to set HYDRA_FULL_ERROR; hpframe reports it like a plan error: one line, exit
code 2. ``check_known_keys`` also refuses keys that ``+key=value`` added under a schema node, which
Hydra itself accepts and OmegaConf.to_object then drops without a word.
"""

from __future__ import annotations

import dataclasses
import re

from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from hpframe.config import schema
from hpframe.errors import UserError, did_you_mean

CONFIG_ERRORS = (HydraException, OmegaConfBaseException)
"""Exceptions Hydra and OmegaConf raise while composing, before hpframe's code runs."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fields(object_type: object) -> list[str]:
    return [f.name for f in dataclasses.fields(object_type)] if dataclasses.is_dataclass(object_type) else []


def _unknown_key(key: str, object_type: object) -> str:
    parent, _, leaf = key.rpartition(".")
    names = _fields(object_type)
    close = did_you_mean(leaf, names)
    hint = close.replace("mean ", f"mean {parent}.") if close and parent else close
    where = f"'{parent}'" if parent else "the top level"
    return f"{key}: no such key in {where}{hint}" + ("" if hint or not names else f"; keys: {', '.join(names)}")


def _missing_option(err: MissingConfigException) -> str:
    group, _, name = (err.missing_cfg_file or "").rpartition("/")
    options = [o for o in err.options or [] if o != "schema"]  # the group's schema entry is no choice
    if not group or not options:
        return _one_line(str(err).split("\n\n")[0])
    hint = did_you_mean(name, options)
    return f"{group}={name}: no such option in group '{group}'{hint}; choose one of: {', '.join(options)}"


def describe_config_error(err: BaseException) -> str:
    """One line for a composition error: the key (or override) at fault and what is wrong with it."""
    if isinstance(err, MissingConfigException):
        return _missing_option(err)
    cause = err.__cause__ if isinstance(err, ConfigCompositionException) and err.__cause__ is not None else err
    override = re.search(r"(?:Could not override|Error merging override) '?([^'\s]+)'?", str(err))
    key = override.group(1) if override else str(getattr(cause, "full_key", "") or "")
    nested = re.search(r"^In '([^']+)': \w+ raised while composing config:\s+Key '\w+' not in '(\w+)'\s+full_key: (\S+)", str(err))
    if nested:  # a misspelled key inside a YAML file (a recipe, a group option): Hydra keeps only the text
        where, cls, full_key = nested.groups()
        return f"{_unknown_key(full_key, getattr(schema, cls, None))} (in {where}.yaml)"
    if isinstance(cause, (ConfigKeyError, AttributeError)) and "not in" in str(cause):
        key = str(getattr(cause, "full_key", "") or key.split("=", 1)[0])
        return _unknown_key(key, getattr(cause, "object_type", None))
    if isinstance(cause, MissingMandatoryValue):
        return f"{cause.full_key}: a value is required (set {cause.full_key}=...)"
    message = _one_line(str(cause).split("\n")[0])  # omegaconf appends full_key/object_type lines
    if isinstance(cause, ValidationError) and key:
        return f"{key}: {message}"
    if isinstance(err, OverrideParseException):
        return f"cannot parse the override: {message} (syntax: https://hydra.cc/docs/1.3/advanced/override_grammar/basic/)"
    return f"{key}: {message}" if key else message


def check_known_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Raise UserError for a key under a schema node that its dataclass does not declare (``+parallel.tpp=2``)."""
    names = _fields(OmegaConf.get_type(cfg))
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if names and key not in names:
            raise UserError(_unknown_key(full, OmegaConf.get_type(cfg)), key=full)
        child = cfg._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_known_keys(child, prefix=f"{full}.")
