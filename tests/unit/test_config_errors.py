"""Composition errors become one line naming the key (with "did you mean ..." where close), as plan
errors do: a misspelled key (also added with ``+``, which Hydra itself accepts), a value of the wrong
type, an unknown recipe or group option, a required value left unset. Internal errors are not reported
as invalid configuration: run.train_main returns 2 for a UserError only and lets any other exception
through. In-process through Hydra's compose API, plus one launch.py subprocess for the exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from hpframe.config.convert import to_run_config
from hpframe.config.errors import CONFIG_ERRORS, describe_config_error
from hpframe.config.store import CONF_DIR, register_configs
from hpframe.errors import UserError, did_you_mean
from hpframe.plan import PlanError

REPO = Path(__file__).resolve().parents[2]


def _error_line(*overrides: str) -> str:
    """The one line hpframe prints for composing ``overrides`` (composition or conversion error)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            to_run_config(compose(config_name="config", overrides=list(overrides)))
        except CONFIG_ERRORS as err:
            return describe_config_error(err)
        except UserError as err:
            return str(err)
    raise AssertionError(f"{overrides} composed without an error")


@pytest.mark.parametrize("overrides, expected", [
    (["parallel.tpp=2"], "parallel.tpp: no such key in 'parallel' (did you mean parallel.tp?)"),
    (["+parallel.tpp=2"], "parallel.tpp: no such key in 'parallel' (did you mean parallel.tp?)"),
    (["+train.num_step=3"], "train.num_step: no such key in 'train'"),
    (["clusterr=h200x8"], "clusterr: no such key in the top level (did you mean cluster?)"),
    (["parallel.tp=abc"], "parallel.tp=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["train.dtype=bf17"], "train.dtype=bf17: Invalid value 'bf17', expected one of [fp32, bf16]"),
    (["recipe=mixtral_8x8b"], "recipe=mixtral_8x8b: no such option in group 'recipe' (did you mean mixtral_8x7b?); choose one of: "
                              "deepseek_debug, deepseek_h200, deepseek_v3, gpt3_175b, gpt_debug, mixtral_8x22b, mixtral_8x7b, "
                              "mixtral_debug, mixtral_h200"),
    (["cluster=h200x9"], "cluster=h200x9: no such option in group 'cluster' (did you mean h200x8?)"),
    (["model.hidden_size=???"], "model.hidden_size: a value is required (set model.hidden_size=...)"),
])
def test_composition_error_is_one_line(overrides: list[str], expected: str) -> None:
    line = _error_line(*overrides)
    assert line.startswith(expected) and "\n" not in line, line


def test_added_key_under_schema_node_is_refused_with_its_key() -> None:
    """``+key=value`` opens the node; without the check OmegaConf.to_object dropped the key silently."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+parallel.tpp=2"])
    with pytest.raises(UserError, match=r"parallel\.tpp: no such key") as info:
        to_run_config(cfg)
    assert info.value.key == "parallel.tpp"


def test_did_you_mean_only_when_close() -> None:
    assert did_you_mean("zero_stag", ["zero_stage", "tp"]) == " (did you mean zero_stage?)"
    assert did_you_mean("banana", ["zero_stage", "tp"]) == ""
    assert issubclass(PlanError, UserError) and issubclass(UserError, ValueError)


def test_launch_exits_2_with_one_line_for_an_added_key(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "launch.py"), "+parallel.tpp=2", "plan.dry_run=true"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        "hpframe: invalid configuration: parallel.tpp: no such key in 'parallel' (did you mean parallel.tp?)"]


@pytest.mark.parametrize("error, code", [(UserError("data.path='x' has no meta.json", key="data.path"), 2),
                                         (ValueError("an internal invariant broke"), None)])
def test_train_main_reports_user_errors_only(compose_cfg, monkeypatch, tmp_path, error: Exception, code: int | None) -> None:
    """A UserError raised while the run starts is exit code 2; any other ValueError is a bug and propagates."""
    import hpframe.parallel
    from hpframe.plan import make_plan
    from hpframe.run import train_main

    def fail(plan: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(hpframe.parallel, "init_distributed", fail)  # the first step of train_main
    cfg = compose_cfg("recipe=mixtral_debug")
    cfg.output_dir = str(tmp_path)
    if code is None:
        with pytest.raises(ValueError, match="an internal invariant broke"):
            train_main(cfg, make_plan(cfg))
    else:
        assert train_main(cfg, make_plan(cfg)) == code
        assert "data.path='x' has no meta.json" in (tmp_path / "error_rank0.txt").read_text()


def test_cli_reports_an_internal_error_as_a_bug(monkeypatch, capsys, tmp_path) -> None:
    """An exception from hpframe's code after composition (here an omegaconf error, a composition error's
    type) is not 'invalid configuration': exit code 1, the traceback, and a line saying it is a bug."""
    import hpframe.run
    from hpframe import cli
    from omegaconf.errors import ConfigKeyError

    def broken(cfg: object) -> int:
        raise ConfigKeyError("an internal lookup failed")

    monkeypatch.setattr(hpframe.run, "main_from_hydra", broken)
    monkeypatch.setattr(cli, "_TASK_STARTED", False)
    monkeypatch.setattr(sys, "argv", ["launch.py", "plan.dry_run=true", f"hydra.run.dir={tmp_path}", "hydra.output_subdir=null"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert "Traceback" in err and "an internal lookup failed" in err and "invalid configuration" not in err
    assert err.strip().splitlines()[-1].startswith("hpframe: internal error: this is a bug in hpframe")
