"""hpframe's command line: ``python launch.py [recipe=NAME] [key=value ...]`` or, installed, ``hpframe ...``.

Composes the Hydra configuration (schema + hpframe/conf/ + hpframe/recipes/ + overrides), converts it
to a typed RunConfig and hands it to ``hpframe.run.main``. User errors (an impossible plan, a bad value)
print one clear message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

import hydra
from omegaconf import DictConfig

from hpframe.config.hf_config import HFConfigError, expand_overrides
from hpframe.config.store import CONF_DIR, register_configs
from hpframe.rundir import register_resolvers


def strip_local_rank(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local-rank N``, which the DeepSpeed launcher (and the legacy
    torch.distributed.launch) append to the script's arguments; Hydra would reject them. The value is
    kept in LOCAL_RANK, where those launchers also put it."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank", "--local-rank")):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "0")
            os.environ.setdefault("LOCAL_RANK", value)
            i += 1 if "=" in arg else 2
            continue
        out.append(arg)
        i += 1
    return out


_TASK_STARTED = False
"""Set once Hydra has composed the config and called ``hydra_main``: later exceptions are not composition errors."""


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    """Hydra's entry: run the composed config; exit with the run's code."""
    global _TASK_STARTED
    _TASK_STARTED = True
    from hpframe.launcher import exit_worker, under_launcher
    from hpframe.run import main_from_hydra

    code = main_from_hydra(cfg)
    if under_launcher():  # a torchrun / DeepSpeed-launcher worker: no interpreter teardown (see exit_worker)
        exit_worker(code)
    if code:
        sys.exit(code)


def main() -> None:
    """Console entry (``hpframe``, ``python launch.py``): register the configs, then let Hydra compose and run.

    A composition error (misspelled key, wrong type, unknown recipe) is one line and exit code 2, as
    the planner's refusals are; any other exception is a bug in hpframe and keeps its traceback."""
    from hpframe.config.errors import CONFIG_ERRORS, describe_config_error
    from hpframe.run import EXIT_USER_ERROR

    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        from hpframe.config.help import render_help

        print(render_help())
        return
    register_configs()
    register_resolvers()  # ${hpframe_pid:} in the run directory's name (hpframe/conf/config.yaml)
    sys.argv = strip_local_rank(sys.argv)
    try:  # model.from_hf=DIR: DIR/config.json's fields join the overrides, so Hydra composes the real model
        sys.argv = sys.argv[:1] + expand_overrides(sys.argv[1:])
    except HFConfigError as err:
        print(f"hpframe: invalid configuration: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra re-raises instead of printing and exiting 1
    try:
        hydra_main()
    except Exception as err:
        if isinstance(err, CONFIG_ERRORS) and not _TASK_STARTED:  # raised while composing, before hpframe's code ran
            print(f"hpframe: invalid configuration: {describe_config_error(err)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        traceback.print_exc()  # anything else is a bug in hpframe, reported as one with its traceback
        print("hpframe: internal error: this is a bug in hpframe, not a problem with your configuration; "
              "please report it with the traceback above", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
