"""Starting the processes of a run on this machine, and agreeing on one run directory.

``python launch.py`` runs as one process. When the plan needs several processes and none were
started by a launcher (RANK/WORLD_SIZE unset), ``launch_local`` starts them through
torch.distributed's elastic launcher (the machinery behind torchrun): the composed config is written
to ``RUN_DIR/run_config.yaml`` and every worker runs ``python -m hpframe.launcher RUN_DIR/run_config.yaml``,
so all ranks share one config and one run directory. Under torchrun or the DeepSpeed launcher
(RANK/WORLD_SIZE set) each rank composed its own config; ``agree_on_run_dir`` makes them all use
rank 0's run directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from pathlib import Path

from omegaconf import OmegaConf

from hpframe.config.convert import from_dict, to_dict
from hpframe.config.schema import RunConfig
from hpframe.logging import get_logger

log = get_logger(__name__)

CONFIG_FILE = "run_config.yaml"


def under_launcher() -> bool:
    """True when a launcher (torchrun, the DeepSpeed launcher, launch_local) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def write_run_config(cfg: RunConfig) -> Path:
    """Write the composed config (resolved, plain YAML) into the run directory; return its path."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    return path


def read_run_config(path: str | Path) -> RunConfig:
    """The RunConfig a worker runs, as written by ``write_run_config``."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(data, dict)
    return from_dict(data)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_local(cfg: RunConfig, nproc: int, *, module: str = "hpframe.launcher", extra_args: tuple[str, ...] = ()) -> int:
    """Start ``nproc`` workers on this machine through ``elastic_launch``; return the run's exit code.

    Each worker runs ``python -m MODULE RUN_DIR/run_config.yaml EXTRA_ARGS...`` (``hpframe.evaluate``
    starts its workers this way too). The exit code is 0 when every worker succeeded, else the exit
    code of the first failed worker (so a worker's user error (2) or non-finite stop (3) reaches the
    shell unchanged).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    path = write_run_config(cfg)
    # two CPU processes per core would fight over OpenMP threads; torchrun makes the same choice
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"hpframe-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0, monitor_interval=0.2,
        # workers print to this console; the agent's per-worker error files go to the run directory
        logs_specs=DefaultLogsSpecs(log_dir=str(Path(cfg.output_dir) / "elastic")),
    )
    log.info(f"starting {nproc} local processes (torch.distributed elastic launch), config {path}")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", module, str(path), *extra_args)
    except ChildFailedError as err:
        # the agent kills the remaining workers once one exits with an error (negative exit codes):
        # report the earliest worker that exited by itself
        own = [(f.timestamp, rank, f.exitcode) for rank, f in err.failures.items() if f.exitcode > 0]
        _, rank, code = min(own) if own else (0, min(err.failures), 1)
        log.error(f"{len(err.failures)} of {nproc} processes failed; first: rank {rank} with exit code {code}")
        return code
    return 0


def single_process_env() -> None:
    """Give a one-process run the environment a launcher would (DeepSpeed insists on LOCAL_RANK)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def agree_on_run_dir(output_dir: str) -> str:
    """Rank 0's run directory, on every rank (a collective over the world group).

    Ranks started by torchrun composed their config separately, so Hydra's time-stamped run directory
    can differ by a second between them. The directory a non-zero rank created for itself is removed
    when it holds nothing but Hydra's own ``.hydra`` files.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return output_dir
    chosen = [output_dir]
    dist.broadcast_object_list(chosen, src=0)
    mine = Path(output_dir)
    if chosen[0] != output_dir and mine.is_dir():
        entries = {p.name for p in mine.iterdir()}
        if entries <= {".hydra"}:
            shutil.rmtree(mine / ".hydra", ignore_errors=True)
            try:
                mine.rmdir()
            except OSError:  # another rank of this node may share it, or something else was written
                pass
    return str(chosen[0])


def exit_worker(code: int) -> None:
    """End a worker process right after its clean shutdown: flush, then ``os._exit(code)``.

    After a run has finished (metrics, TensorBoard and checkpoint files closed, process group
    destroyed), the interpreter's teardown occasionally aborts in C++ static destructors of the
    distributed runtime ("terminate called without an active exception", exit -6); seen once in three
    clean CI runs of the suite. That would turn a finished run into a failed worker, and under
    ``torchrun --max-restarts`` into a restart. Skipping the teardown removes the race.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def worker_main(argv: list[str]) -> int:
    """Entry of a worker started by ``launch_local``: run the written config."""
    if len(argv) != 1:
        print("usage: python -m hpframe.launcher RUN_DIR/run_config.yaml", file=sys.stderr)
        return 2
    from hpframe.run import main

    return main(read_run_config(argv[0]))


if __name__ == "__main__":
    exit_worker(worker_main(sys.argv[1:]))
