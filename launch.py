"""hpframe's entry point: ``python launch.py [recipe=NAME] [key=value ...]``.

Composes the Hydra configuration (schema + conf/ + recipes/ + overrides), converts it to a typed
RunConfig and hands it to ``hpframe.run.main``. User errors (an impossible plan, a bad value) print one
clear message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from hpframe.config.store import CONF_DIR, register_configs
from hpframe.rundir import register_resolvers

register_configs()
register_resolvers()  # ${hpframe_pid:} in the run directory's name (conf/config.yaml)


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


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hpframe.launcher import exit_worker, under_launcher
    from hpframe.run import main_from_hydra

    code = main_from_hydra(cfg)
    if under_launcher():  # a torchrun / DeepSpeed-launcher worker: no interpreter teardown (see exit_worker)
        exit_worker(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    sys.argv = strip_local_rank(sys.argv)
    main()
