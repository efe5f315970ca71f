"""Held-out loss and perplexity of a checkpoint or a Hugging Face model directory, without training.

    python -m hpframe.evaluate SOURCE [key=value ...]

SOURCE is a committed checkpoint (``.../checkpoints/step_00000040``), a checkpoint root (its newest
good checkpoint), or a Hugging Face model directory (``config.json`` + safetensors; read through
``model.from_hf``). A checkpoint brings the run's own config; ``key=value`` overrides change the data
(``data.path``, which implies ``data.kind=tokenized``; ``data.eval_path``, ``data.document_mask``,
``train.eval_steps``), the layout
(``parallel.*``, at any layout: the checkpoint is re-sharded as on resume) or anything else. A model
directory is composed like ``launch.py model.from_hf=DIR``, so a recipe may set the layout.

The figure is computed exactly as ``train.eval_interval`` computes it during training (the same
held-out micro-batches, ``hpframe.train.loop.evaluate_loss``), so at the same step, data and
micro-batch size the numbers agree. Layouts that need several processes start them on this machine
(as ``launch.py`` does). Rank 0 prints one line and writes ``RUN_DIR/eval.json`` (``output_dir=``,
default ``outputs/evaluate/DATE/TIME``). Exit codes: 0, 2 for a user error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from hpframe.config.schema import RunConfig
from hpframe.errors import UserError
from hpframe.logging import get_logger

log = get_logger(__name__)
RESULT_FILE = "eval.json"
WORKER_FLAG = "--worker"


def _checkpoint_config(path: Path, overrides: list[str]) -> RunConfig:
    """The run config stored in a checkpoint, with ``key=value`` overrides merged (types checked)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from hpframe.checkpoint.portable import CLIENT_STATE

    stored = json.loads((path / CLIENT_STATE).read_text())["config"]
    try:
        node = OmegaConf.merge(OmegaConf.structured(RunConfig), stored, OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(node)
    except OmegaConfBaseException as err:
        raise UserError(f"override {overrides}: {err}") from None
    assert isinstance(cfg, RunConfig)
    return cfg


def _model_dir_config(directory: Path, overrides: list[str]) -> RunConfig:
    """A Hugging Face model directory: composed as ``launch.py model.from_hf=DIR overrides``."""
    from hydra import compose, initialize_config_dir

    from hpframe.config.convert import to_run_config
    from hpframe.config.store import CONF_DIR, register_configs

    from hpframe.config.hf_config import HFConfigError, expand_overrides

    register_configs()
    try:  # as launch.py does: DIR/config.json's fields join the overrides
        full = expand_overrides([f"model.from_hf={directory}", *overrides])
    except HFConfigError as err:
        raise UserError(str(err)) from None
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose("config", overrides=full))


def build_config(source: str, overrides: list[str]) -> tuple[RunConfig, Path | None]:
    """(config, checkpoint to load or None for a model directory) of ``SOURCE [overrides]``."""
    from hpframe.checkpoint import store
    from hpframe.export import resolve_checkpoint

    path = Path(source)
    if not path.exists():
        raise UserError(f"{source!r} not found (a checkpoint directory, a checkpoint root or a model directory)")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"overrides must be key=value, got {bad}")
    if any(o.startswith("data.path=") for o in overrides) and not any(o.startswith(("data=", "data.kind=")) for o in overrides):
        overrides = [*overrides, "data.kind=tokenized"]  # a data.path names prepared shards
    if (path / "config.json").is_file() and not (path / store.MANIFEST).is_file():
        cfg, ckpt = _model_dir_config(path, overrides), None
    else:
        try:
            ckpt = resolve_checkpoint(path)
        except ValueError as err:  # export's resolver: no committed checkpoint there
            raise UserError(str(err)) from None
        cfg = _checkpoint_config(ckpt, overrides)
    if not any(o.startswith("data.inputs=") for o in overrides):
        cfg.data.inputs = []  # evaluation reads prepared data; it prepares only when asked on its command line
    if not any(o.startswith("output_dir=") for o in overrides):
        cfg.output_dir = str(Path("outputs") / "evaluate" / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S"))
    return cfg, ckpt


def evaluate_main(cfg: RunConfig, plan: Any, checkpoint: Path | None) -> int:
    """This process's part: model, engine, checkpoint, held-out batches, ``evaluate_loss``. Exit code."""
    import torch
    import torch.distributed as dist

    from hpframe.checkpoint import manager
    from hpframe.data import build_data
    from hpframe.engine import build_engine
    from hpframe.machine import prepare_process
    from hpframe.models import build_model
    from hpframe.parallel import init_distributed, parallelize
    from hpframe.run import open_hf_weights, resolve_vocab_padding
    from hpframe.train.loop import eval_record, evaluate_loss

    try:
        prepare_process(cfg, local_procs=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        groups = init_distributed(plan)
        resolve_vocab_padding(cfg, plan.tp)
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.moe, routing_groups=plan.experts.routing_groups if plan.experts else None)
        # a model directory's weights are read slice by slice as at the start of a run; a checkpoint's
        # are loaded below (over random initial weights)
        weights = open_hf_weights(cfg.model.from_hf, model) if checkpoint is None and cfg.model.from_hf else None
        model = parallelize(model, plan, groups, sequence_parallel=cfg.parallel.sequence_parallel,
                            recompute=cfg.parallel.recompute, compile=False, ep_overlap=cfg.parallel.ep_overlap,
                            init_seed=cfg.train.seed, weights=weights)
        engine = build_engine(model, plan, groups, cfg)
        step = 0
        if checkpoint is not None:
            state = manager.load(engine, checkpoint, plan_fingerprint=manager.plan_fingerprint(plan, cfg))
            step = int(state["step"])
        data = build_data(cfg, plan, dist.get_rank())
        log.info(f"data: {data.description}")
        record = eval_record(step, evaluate_loss(engine, data, plan), data, plan)
        record.update(source=str(checkpoint) if checkpoint is not None else cfg.model.from_hf,
                      layout=manager.layout_of(plan))
        if dist.get_rank() == 0:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.output_dir) / RESULT_FILE).write_text(json.dumps(record, indent=1) + "\n")
            print(f"eval: {json.dumps(record)}", flush=True)
        return 0
    except UserError as err:
        log.error(f"hpframe.evaluate: {err}")
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Command line: plan, start the processes the layout needs, evaluate. Returns the exit code."""
    from hpframe.launcher import launch_local, read_run_config, single_process_env, under_launcher
    from hpframe.plan import make_plan

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 3 and argv[1] == WORKER_FLAG:  # a worker started by launch_local below: CONFIG --worker CKPT
        from hpframe.launcher import watch_parent

        watch_parent()  # ends with the launcher
        cfg = read_run_config(argv[0])
        return evaluate_main(cfg, make_plan(cfg), Path(argv[2]) if argv[2] else None)
    if not argv or argv[0].startswith("-"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        cfg, checkpoint = build_config(argv[0], argv[1:])
        plan = make_plan(cfg)
    except UserError as err:  # PlanError is one
        print(f"hpframe.evaluate: {err}", file=sys.stderr)
        return 2
    if not under_launcher() and plan.world_size > 1:
        return launch_local(cfg, plan.world_size, module="hpframe.evaluate",
                            extra_args=(WORKER_FLAG, str(checkpoint or "")))
    if not under_launcher():
        single_process_env()
    return evaluate_main(cfg, plan, checkpoint)


if __name__ == "__main__":
    from hpframe.launcher import exit_worker, under_launcher

    code = main()
    if under_launcher():
        exit_worker(code)
    sys.exit(code)
