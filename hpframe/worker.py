"""A worker process of a local run: ``python -m hpframe.worker RUN_DIR/run_config.yaml``.

``hpframe.launcher.launch_local`` starts one per rank; each reads the config the launcher wrote and
runs ``hpframe.run.main`` with it (which, under the launcher's RANK/WORLD_SIZE, trains this rank's
part). Kept apart from ``hpframe.launcher`` so that ``run`` imports the launcher and this module
imports ``run``, without an import cycle.
"""

from __future__ import annotations

import sys

from hpframe.launcher import exit_worker, read_run_config
from hpframe.run import main


def worker_main(argv: list[str]) -> int:
    """Entry of a worker started by ``launch_local``: run the written config."""
    if len(argv) != 1:
        print("usage: python -m hpframe.worker RUN_DIR/run_config.yaml", file=sys.stderr)
        return 2
    return main(read_run_config(argv[0]))


if __name__ == "__main__":
    exit_worker(worker_main(sys.argv[1:]))
