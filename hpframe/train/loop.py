"""The training loop: steps, LR schedule, non-finite detection, evaluation, metrics and checkpoints.

No parallel logic lives here: the engine runs one optimizer step over this rank's micro-batches
(forward, LM + aux loss, backward, clipping, the optimizer and the MoE bias update); the loader hands
out this rank's share of the global batch. Step numbers count completed optimizer steps: the first
line of metrics.jsonl is ``step`` 1, and a checkpoint taken at step k resumes with step k + 1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hpframe.checkpoint import faults, manager
from hpframe.checkpoint.async_save import Checkpointer
from hpframe.config.convert import to_dict
from hpframe.config.schema import RunConfig
from hpframe.data import Data
from hpframe.logging import current_rank, get_logger
from hpframe.train.metrics import MetricsWriter, dropped_frac, mfu, summarize_moe
from hpframe.train.progress import Progress
from hpframe.train.schedule import lr_at

if TYPE_CHECKING:
    from hpframe.plan import ParallelPlan

log = get_logger(__name__)

EXIT_NONFINITE = 3
"""Process exit code of a run stopped by train.max_nonfinite_steps consecutive non-finite steps."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss; the run stops with EXIT_NONFINITE."""


@dataclass
class TrainResult:
    """What ``train`` returns: the records it wrote and where."""

    steps_done: int
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: Path | None = None


def checkpoint_interval(cfg: RunConfig, plan: "ParallelPlan") -> int:
    """Steps between saves: checkpoint.interval, or the plan's recommendation when it is 0.

    0 means no periodic saves (the loop still saves once at the end).
    """
    if cfg.checkpoint.interval > 0:
        return cfg.checkpoint.interval
    if plan.checkpoint is None:
        return 0
    return max(1, int(plan.checkpoint.interval_steps))


def _resume_path(cfg: RunConfig, root: Path) -> Path | None:
    choice = cfg.checkpoint.resume
    if choice == "none":
        return None
    if choice == "auto":
        return manager.find_latest(root)
    return Path(choice)


def as_pairs(batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sequences [B, S+1] -> (tokens [B, S], targets [B, S]) shifted by one, the engine's micro-batch form."""
    return [(b[:, :-1], b[:, 1:]) for b in batches]


def _evaluate(engine: Any, data: Data, plan: "ParallelPlan") -> float:
    """Mean held-out LM loss; a pipelined engine takes grad_accum micro-batches per call."""
    batches = as_pairs(data.eval)
    chunk = plan.grad_accum if plan.pp > 1 else len(batches)
    losses = [float(engine.eval_step(batches[i : i + chunk])) for i in range(0, len(batches), chunk)]
    return sum(losses) / len(losses)


def train(engine: Any, data: Data, plan: "ParallelPlan", cfg: RunConfig) -> TrainResult:
    """Run ``train.steps`` optimizer steps (resuming if asked); returns the metrics written."""
    run_dir = Path(cfg.output_dir)
    rank0 = current_rank() == 0
    ckpt_root = Path(cfg.checkpoint.dir) if Path(cfg.checkpoint.dir).is_absolute() else run_dir / cfg.checkpoint.dir
    interval = checkpoint_interval(cfg, plan) if cfg.checkpoint.enabled else 0
    fingerprint = manager.plan_fingerprint(plan, cfg)
    tokens_per_step = plan.global_batch_size * cfg.data.seq_len
    result = TrainResult(steps_done=0)

    start, consumed_tokens = 0, 0
    path = _resume_path(cfg, ckpt_root)
    if path is not None:
        state = manager.load(engine, path, plan_fingerprint=fingerprint)
        start, consumed_tokens = int(state["step"]), int(state["consumed_tokens"])
        data.train.load_state_dict(state["data"])
        result.resumed_from = path
        log.info(f"resumed from {path}: step {start}, {consumed_tokens:,} tokens consumed")
    if cfg.checkpoint.enabled:
        every = f"every {interval} steps and " if interval else ""
        log.info(f"checkpoints {every}at the end in {ckpt_root}")

    # one Checkpointer for the run: with checkpoint.async_save at most one save is in flight
    checkpointer = (
        Checkpointer(engine, ckpt_root, keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save)
        if cfg.checkpoint.enabled else None
    )

    def save(step: int) -> None:
        assert checkpointer is not None
        # RNG states are saved per rank by the checkpointer; the rest is JSON in client_state.json
        client_state = {
            "step": step, "consumed_tokens": consumed_tokens, "data": data.train.state_dict(),
            "config": to_dict(cfg), "plan_fingerprint": fingerprint, "layout": manager.layout_of(plan),
        }
        stats = checkpointer.save(step, manager.json_client_state(client_state))
        result.checkpoints.append(stats.path)
        how = "writing in the background" if cfg.checkpoint.async_save else "saved"
        log.info(f"checkpoint {stats.path}: {how} (training stalled {stats.stall_s:.2f} s)")

    def evaluate(step: int) -> None:
        record = {"step": step, "eval_loss": _evaluate(engine, data, plan)}
        result.evals.append(record)
        writer.write(record, prefix="eval")
        log.info(f"eval step {step}: loss {record['eval_loss']:.4f}")

    writer = MetricsWriter(run_dir, enabled=rank0, tensorboard=cfg.train.tensorboard)
    progress = Progress(total=cfg.train.steps, start=start, enabled=rank0 and cfg.train.progress)
    nonfinite = 0
    step, last_saved, last_eval = start, start if path is not None else -1, -1
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            lr = lr_at(step - 1, lr=cfg.train.lr, min_lr=cfg.train.min_lr, warmup_steps=cfg.train.warmup_steps, total_steps=cfg.train.steps)
            engine.set_lr(lr)
            t0 = time.perf_counter()
            out = engine.train_step(as_pairs(data.train.next_step()))
            elapsed = time.perf_counter() - t0
            consumed_tokens += tokens_per_step
            loss = float(out.loss)
            # the engine skips the optimizer update when the loss or the gradient norm is not finite
            bad = bool(out.skipped) or not math.isfinite(loss) or not math.isfinite(float(out.grad_norm))
            nonfinite = nonfinite + 1 if bad else 0
            cv, dropped = summarize_moe(out.moe_stats)
            dropped = dropped or dropped_frac(engine.module)
            tps = tokens_per_step / elapsed
            record = {
                "step": step, "loss": loss, "lm_loss": float(out.lm_loss), "aux_loss": float(out.aux_loss), "lr": lr,
                "grad_norm": float(out.grad_norm), "tokens_per_s": tps,
                "mfu": mfu(tps, plan.flops_per_token, plan.world_size, cfg.cluster.peak_tflops),
                "expert_load_cv": cv, "dropped_token_frac": dropped, "skipped": bad,
                "consumed_tokens": consumed_tokens, "step_time_s": elapsed,
            }
            result.history.append(record)
            writer.write(record)
            if bad:
                log.warning(
                    f"step {step}: non-finite loss or gradients (loss {loss}, grad norm {record['grad_norm']}); "
                    f"step skipped ({nonfinite}/{cfg.train.max_nonfinite_steps} in a row)"
                )
                if nonfinite >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite} consecutive steps with a non-finite loss or gradients (train.max_nonfinite_steps="
                        f"{cfg.train.max_nonfinite_steps}), last at step {step}; lower train.lr or check the data"
                    )
            progress.update(record, log_line=step % cfg.train.log_interval == 0 or step == cfg.train.steps)
            result.steps_done = step
            faults.maybe_fail(cfg.train.fail_at_step, step)  # restart tests only; no-op when 0
            if cfg.train.eval_interval and step % cfg.train.eval_interval == 0:
                evaluate(step)
                last_eval = step
            if interval and step % interval == 0:
                save(step)
                last_saved = step
        if result.steps_done and last_eval != step:
            evaluate(step)
        if cfg.checkpoint.enabled and last_saved != step:
            save(step)
    finally:
        if checkpointer is not None:
            checkpointer.close()  # the last asynchronous save is committed before the process ends
        progress.close()
        writer.close()
    return result
