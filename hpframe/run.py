"""The data-flow line of hpframe, one call per arrow (see docs/design.md).

    RunConfig --make_plan--> ParallelPlan --init_distributed--> ParallelGroups --build_model + init_weights-->
    Transformer --parallelize--> local shards --build_engine--> Engine --build_data--> Data --train--> metrics

With several processes needed and no launcher around, ``main`` starts them (``hpframe.launcher``)
and each of them runs ``train_main``.

Exit codes: 0 success, 2 user error (bad config, impossible plan, run directory in use, checkpoint directory
not writable or too small), 3 stopped by non-finite losses, 4 stopped by SIGTERM/SIGINT with a final
checkpoint, 5 stopped by SIGTERM/SIGINT without one, 6 a checkpoint failed and a later one could not
succeed; 128 + N: a worker killed by signal N.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from hpframe.config.convert import to_run_config
from hpframe.config.schema import PlanFormat, RunConfig
from hpframe.errors import UserError
from hpframe.logging import get_logger

if TYPE_CHECKING:
    from hpframe.rundir import RunLock

log = get_logger(__name__)
EXIT_USER_ERROR = 2
PLAN_SHOWN = "HPFRAME_PLAN_SHOWN"
RUN_DIR_CLAIMED = "HPFRAME_RUN_DIR_CLAIMED"
"""Set by the process that locked the run directory (launch.py) for itself and the workers it starts."""
LOG_FILE = "train.log"
PLAN_FILE = "plan.json"
COLLECTIVE_TIMEOUT_FLOOR_S = 600.0


def main_from_hydra(cfg: DictConfig) -> int:
    """Hydra entry: convert, fill in the run directory, run. Returns the process exit code.

    The directory Hydra created is removed again when the run left nothing in it (a dry run, a refused
    configuration).
    """
    from hydra.core.hydra_config import HydraConfig

    from hpframe.rundir import discard_if_unused

    try:
        run_cfg = to_run_config(cfg)
    except UserError as err:
        print(f"hpframe: invalid configuration: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if HydraConfig.initialized():
        run_cfg.output_dir = HydraConfig.get().runtime.output_dir
    try:
        return main(run_cfg)
    finally:
        discard_if_unused(run_cfg.output_dir)


def _render(plan: object, cfg: RunConfig) -> str:
    from hpframe.plan.report import render_json, render_table

    return render_json(plan, cfg) if cfg.plan.format == PlanFormat.json else render_table(plan, cfg)


def collective_timeout_s(cfg: RunConfig, plan: Any) -> float:
    """How long a collective waits for the other ranks: train.collective_timeout_s, or derived from the plan.

    Derived: max(600 s, 20 x the estimated step time, 4 x the estimated checkpoint write time), so a
    stalled rank (stopped, hung in I/O) fails the run in minutes rather than torch's default 30.
    """
    if cfg.train.collective_timeout_s > 0:
        return float(cfg.train.collective_timeout_s)
    step = plan.time.step_seconds if plan.time is not None else 0.0
    write = plan.checkpoint.write_seconds if plan.checkpoint is not None else 0.0
    return max(COLLECTIVE_TIMEOUT_FLOOR_S, 20.0 * step, 4.0 * write)


def claim_run_dir(cfg: RunConfig, plan: Any) -> "RunLock":
    """Before anything runs: lock the run directory for this job, log to RUN/train.log, record the plan,
    and check that checkpoints can be written there. Raises UserError (RunDirBusyError, PlanError) otherwise."""
    from pathlib import Path

    from hpframe.logging import log_to_file
    from hpframe.plan.report import render_json, render_table
    from hpframe.rundir import RunLock, check_checkpoint_dir

    lock = RunLock(cfg.output_dir).acquire()
    try:
        run_dir = Path(cfg.output_dir)
        if cfg.checkpoint.enabled:  # before anything is written: a refused run leaves no directory
            root = Path(cfg.checkpoint.dir)
            check_checkpoint_dir(root if root.is_absolute() else run_dir / root,
                                 plan.checkpoint.bytes if plan.checkpoint is not None else 0)
        log_to_file(run_dir / LOG_FILE)
        (run_dir / PLAN_FILE).write_text(render_json(plan, cfg) + "\n")
        log.info("plan:\n" + render_table(plan, cfg), console=False)
    except BaseException:
        lock.release()
        raise
    return lock


def main(cfg: RunConfig) -> int:
    """Plan, then (unless a dry run) train, starting local processes when the plan needs them."""
    from hpframe.launcher import launch_local, single_process_env, under_launcher, watch_parent
    from hpframe.logging import close_log_files
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
    if under_launcher():  # a worker of launch_local, torchrun or the DeepSpeed launcher
        watch_parent()
        if os.environ.get("RANK") == "0" and PLAN_SHOWN not in os.environ:
            print(_render(plan, cfg), flush=True)
        return train_main(cfg, plan)
    print(_render(plan, cfg), flush=True)
    from hpframe.machine import check_placement, probe

    try:  # before any process starts: GPUs and cores for plan.world_size processes; the run directory
        check_placement(cfg, probe(), plan.world_size)  # refusals; each process logs the warnings (train_main)
        lock = claim_run_dir(cfg, plan)
    except UserError as err:
        print(f"hpframe: invalid configuration: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        if plan.world_size > 1:
            os.environ[PLAN_SHOWN] = "1"  # inherited by the workers: rank 0 need not print it again
            os.environ[RUN_DIR_CLAIMED] = "1"  # ... nor lock the directory its launcher holds
            return launch_local(cfg, plan.world_size)
        single_process_env()
        os.environ[RUN_DIR_CLAIMED] = "1"
        return train_main(cfg, plan)
    finally:
        os.environ.pop(RUN_DIR_CLAIMED, None)
        close_log_files()
        lock.release()


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


def _claim_on_rank0(cfg: RunConfig, plan: Any) -> "RunLock | None":
    """``claim_run_dir`` on rank 0 for a job started by an external launcher; every rank raises its refusal."""
    import torch.distributed as dist

    lock, error = None, [""]
    if dist.get_rank() == 0:
        try:
            lock = claim_run_dir(cfg, plan)
        except UserError as err:
            error = [str(err)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise UserError(error[0], key="hydra.run.dir")
    return lock


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
    from hpframe.logging import log_to_file
    from hpframe.train.guards import EXIT_CHECKPOINT_FAILED, CheckpointStorageError
    from hpframe.train.loop import EXIT_NONFINITE, NonFiniteLossError, train
    from hpframe.train.metrics import require_wandb
    from hpframe.train.preempt import EXIT_PREEMPTED, EXIT_PREEMPTED_UNSAVED, Preempted

    lock = None
    try:
        where, warnings = prepare_process(cfg, local_procs=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if cfg.train.wandb:  # on every rank, before anything is built (only rank 0 logs)
            require_wandb()
        groups = init_distributed(plan, timeout_s=collective_timeout_s(cfg, plan))
        memory_warning = check_memory_now(cfg, plan, dist.get_rank())
        cfg.output_dir = agree_on_run_dir(cfg.output_dir)
        if RUN_DIR_CLAIMED not in os.environ:  # under torchrun / the DeepSpeed launcher rank 0 claims it
            lock = _claim_on_rank0(cfg, plan)
        log_to_file(os.path.join(cfg.output_dir, LOG_FILE))
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
        loading = time.perf_counter()
        weights = open_hf_weights(cfg.model.from_hf, model) if cfg.model.from_hf else None
        model = parallelize(model, plan, groups, sequence_parallel=cfg.parallel.sequence_parallel, recompute=cfg.parallel.recompute,
                            compile=cfg.train.compile, ep_overlap=cfg.parallel.ep_overlap, init_seed=cfg.train.seed,
                            weights=weights)
        if weights is not None:
            weights.close()  # unmaps the files: their pages no longer count in this process
            log.info(f"initial weights read into this rank's shards in {time.perf_counter() - loading:.1f} s", all_ranks=True)
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
                  + (f" Full error: {where}." if where else ""))
        return EXIT_USER_ERROR
    except NonFiniteLossError as err:
        log.error(f"hpframe: stopping: {err}")
        return EXIT_NONFINITE
    except Preempted as err:
        code = EXIT_PREEMPTED if err.saved else EXIT_PREEMPTED_UNSAVED
        log.warning(f"hpframe: {err}; exit code {code}")
        return code
    except CheckpointStorageError as err:
        log.error(f"hpframe: stopping: {err}")
        return EXIT_CHECKPOINT_FAILED
    except RuntimeError as err:
        if "timed out" not in str(err).lower():
            raise
        where = _save_traceback(cfg.output_dir)
        log.error(f"hpframe: a collective timed out after {collective_timeout_s(cfg, plan):g} s (train.collective_timeout_s): "
                  f"another rank stalled or died ({str(err).strip().splitlines()[-1]})" + (f"; traceback in {where}" if where else ""))
        return 1
    except UserError as err:
        # one clear line for the user; the traceback goes to a file. Any other exception is a bug
        # in hpframe and propagates with its traceback.
        where = _save_traceback(cfg.output_dir)
        log.error(f"hpframe: invalid configuration: {err}" + (f" (traceback in {where})" if where else ""))
        return EXIT_USER_ERROR
    except Exception:  # a bug: Python prints it on the console; RUN/train.log gets it too
        import traceback

        log.error("hpframe: internal error:\n" + traceback.format_exc().rstrip(), console=False)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:
            lock.release()
