"""hpframe's entry point: ``python launch.py [recipe=NAME] [key=value ...]``.

Composes the Hydra configuration (schema + conf/ + recipes/ + overrides), converts it to a typed
RunConfig and hands it to ``hpframe.run.main``. User errors (an impossible plan, a bad value) print one
clear message and exit with code 2, without a traceback.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from hpframe.config.store import CONF_DIR, register_configs

register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hpframe.run import main_from_hydra

    code = main_from_hydra(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
