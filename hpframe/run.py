"""The data-flow line of hpframe, one call per arrow (see docs/design.md).

    RunConfig --make_plan--> ParallelPlan --init_distributed--> ParallelGroups --build_model + init_weights-->
    Transformer --parallelize--> local shards --build_engine--> Engine --build_data--> Data --train--> metrics

With several processes needed and no launcher around, ``main`` starts them (``hpframe.launcher``)
and each of them runs ``train_main``.

Exit codes: 0 success, 2 user error (bad config, impossible plan), 3 stopped by non-finite losses.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from omegaconf import DictConfig

from hpframe.config.convert import to_run_config
from hpframe.config.schema import PlanFormat, RunConfig
from hpframe.errors import UserError
from hpframe.logging import get_logger

log = get_logger(__name__)
EXIT_USER_ERROR = 2
PLAN_SHOWN = "HPFRAME_PLAN_SHOWN"


def main_from_hydra(cfg: DictConfig) -> int:
    """Hydra entry: convert, fill in the run directory, run. Returns the process exit code."""
    from hydra.core.hydra_config import HydraConfig

    try:
        run_cfg = to_run_config(cfg)
    except UserError as err:
        print(f"hpframe: invalid configuration: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if HydraConfig.initialized():
        run_cfg.output_dir = HydraConfig.get().runtime.output_dir
    return main(run_cfg)


def _render(plan: object, cfg: RunConfig) -> str:
    from hpframe.plan.report import render_json, render_table

    return render_json(plan, cfg) if cfg.plan.format == PlanFormat.json else render_table(plan, cfg)


def main(cfg: RunConfig) -> int:
    """Plan, then (unless a dry run) train, starting local processes when the plan needs them."""
    from hpframe.launcher import launch_local, single_process_env, under_launcher
    from hpframe.plan import make_plan

    from hpframe.config.hf_config import HFConfigError, check_run_config

    try:
        if cfg.model.from_hf:
            check_run_config(cfg.model, cfg.moe)
        plan = make_plan(cfg)
    except UserError as err:
        print(f"hpframe: invalid configuration: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if cfg.plan.dry_run:
        print(_render(plan, cfg))
        return 0
    if not under_launcher() or (os.environ.get("RANK") == "0" and PLAN_SHOWN not in os.environ):
        print(_render(plan, cfg), flush=True)
    if not under_launcher():  # before any process starts: GPUs and cores for plan.world_size processes
        from hpframe.machine import check_placement, probe

        try:
            for warning in check_placement(cfg, probe(), plan.world_size):
                log.warning(warning)
        except UserError as err:
            print(f"hpframe: invalid configuration: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
    if not under_launcher() and plan.world_size > 1:
        os.environ[PLAN_SHOWN] = "1"  # inherited by the workers: rank 0 need not print it again
        return launch_local(cfg, plan.world_size)
    if not under_launcher():
        single_process_env()
    return train_main(cfg, plan)


def _save_traceback(run_dir: str) -> str | None:
    """Write the current exception's traceback to RUN_DIR/error_rank<R>.txt; return the path (None if unwritable)."""
    import traceback
    from pathlib import Path

    path = Path(run_dir) / f"error_rank{os.environ.get('RANK', '0')}.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(traceback.format_exc())
    except OSError:
        return None
    return str(path)


def _log_peak_memory(plan: Any) -> None:
    """On GPUs, this rank's peak allocated memory next to the planner's estimate (planner fidelity)."""
    import torch

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
        est = plan.memory.total if plan.memory is not None else float("nan")
        log.info(f"peak device memory {peak / 2**30:.2f} GiB (planner estimate {est / 2**30:.2f} GiB)", all_ranks=True)


def resolve_vocab_padding(cfg: RunConfig, tp: int) -> None:
    """model.vocab_pad_multiple=0 means parallel.tp: fix it in ``cfg`` (saved with checkpoints) before the
    model is built, so that its shapes are those of the plan."""
    if cfg.model.vocab_pad_multiple == 0:
        cfg.model.vocab_pad_multiple = tp


def open_hf_weights(path: str, model: Any) -> Any:
    """The checked ``HFCheckpoint`` of model.from_hf for ``model`` (meta, unsharded); ValueError if it does not fit."""
    from hpframe.checkpoint.hf_load import HFCheckpoint

    weights = HFCheckpoint(path)
    weights.check(model)
    log.info(f"initial weights: {path} ({len(weights.files)} tensors), read slice by slice into this rank's shards")
    return weights


def train_main(cfg: RunConfig, plan: "object") -> int:
    """This process's part of the run: groups, model, engine, data, loop. Returns the exit code."""
    import torch
    import torch.distributed as dist

    from hpframe.data import build_data
    from hpframe.engine import build_engine
    from hpframe.launcher import agree_on_run_dir
    from hpframe.machine import check_memory_now, oom_report, prepare_process
    from hpframe.models import build_model
    from hpframe.parallel import init_distributed, parallelize
    from hpframe.train.loop import EXIT_NONFINITE, NonFiniteLossError, train

    try:
        where, warnings = prepare_process(cfg, local_procs=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        groups = init_distributed(plan)
        memory_warning = check_memory_now(cfg, plan, dist.get_rank())
        cfg.output_dir = agree_on_run_dir(cfg.output_dir)
        log.info(f"runs on: {where}")
        for warning in [*warnings, *([memory_warning] if memory_warning else [])]:
            log.warning(warning)
        log.info(f"plan: {plan.world_size} processes, tp={plan.tp} pp={plan.pp} dp={plan.dp} ep={plan.ep} "
                 f"zero={plan.zero_stage}, global batch {plan.global_batch_size} x {cfg.data.seq_len} tokens "
                 f"({plan.micro_batch_size} per micro-batch x {plan.grad_accum} accumulation x {plan.dp} dp); run dir {cfg.output_dir}")
        log.info("groups: " + ", ".join(f"{axis} {groups.size(axis)}" for axis in ("tp", "pp", "dp", "ep", "edp"))
                 + f"; rank 0 coordinates {plan.ranks.coords(0)}")
        # built on meta; parallelize materializes, initializes (or reads from model.from_hf) and shards
        # this rank's parts block by block
        resolve_vocab_padding(cfg, plan.tp)
        with torch.device("meta"):
            model = build_model(cfg.model, cfg.moe, routing_groups=plan.experts.routing_groups if plan.experts else None)
        weights = open_hf_weights(cfg.model.from_hf, model) if cfg.model.from_hf else None
        model = parallelize(model, plan, groups, sequence_parallel=cfg.parallel.sequence_parallel, recompute=cfg.parallel.recompute,
                            compile=cfg.train.compile, ep_overlap=cfg.parallel.ep_overlap, init_seed=cfg.train.seed,
                            weights=weights)
        log.info(f"model: {cfg.model.name}, {sum(p.numel() for p in model.parameters() if not p.is_meta):,} "
                 "parameters on this rank")
        engine = build_engine(model, plan, groups, cfg)
        log.info(f"engine: {type(engine).__name__}, ZeRO stage {plan.zero_stage}, {cfg.train.dtype.value}")
        data = build_data(cfg, plan, dist.get_rank())
        log.info(f"data: {data.description}")
        result = train(engine, data, plan, cfg)
        log.info(f"done: {result.steps_done} steps, metrics in {cfg.output_dir}/metrics.jsonl")
        _log_peak_memory(plan)
        return 0
    except torch.OutOfMemoryError:
        where = _save_traceback(cfg.output_dir)
        log.error(oom_report(cfg, plan, dist.get_rank() if dist.is_initialized() else 0)
                  + (f" Traceback in {where}." if where else ""))
        return EXIT_USER_ERROR
    except NonFiniteLossError as err:
        log.error(f"hpframe: stopping: {err}")
        return EXIT_NONFINITE
    except UserError as err:
        # one clear line for the user; the traceback goes to a file. Any other exception is a bug
        # in hpframe and propagates with its traceback.
        where = _save_traceback(cfg.output_dir)
        log.error(f"hpframe: invalid configuration: {err}" + (f" (traceback in {where})" if where else ""))
        return EXIT_USER_ERROR
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
