"""The training loop: steps, LR schedule, non-finite detection, evaluation, metrics and checkpoints.

No parallel logic lives here: the engine runs one optimizer step over this rank's micro-batches
(forward, LM + aux loss, backward, clipping, the optimizer and the MoE bias update); the loader hands
out this rank's share of the global batch. Step numbers count completed optimizer steps: the first
line of metrics.jsonl is ``step`` 1, and a checkpoint taken at step k resumes with step k + 1.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from hpframe.checkpoint import faults, manager, store
from hpframe.checkpoint.async_save import Checkpointer
from hpframe.checkpoint.memory import MemoryTier
from hpframe.config.convert import to_dict
from hpframe.config.schema import RunConfig
from hpframe.data import Data
from hpframe.data.packing import model_inputs
from hpframe.logging import current_rank, get_logger
from hpframe.train.guards import SAVE_ERRORS, after_failed_save, note_batch_change
from hpframe.train.metrics import MetricsWriter, dropped_frac, expert_shares, mfu, summarize_ep_imbalance, summarize_moe
from hpframe.train.preempt import Preempted, StopRequest
from hpframe.train.profile import StepProfiler
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
    resumed_tier: str | None = None
    """Where the resumed state came from: memory | peer | storage (None: not resumed)."""
    received: Any = None
    """From memory or peer: what this rank received from a replica (``memory.Received``: its own part
    when its node had lost it, else nothing)."""


def checkpoint_interval(cfg: RunConfig, plan: "ParallelPlan") -> int:
    """Steps between saves: checkpoint.interval, or the plan's recommendation when it is 0.

    0 means no periodic saves (the loop still saves once at the end).
    """
    if cfg.checkpoint.interval > 0:
        return cfg.checkpoint.interval
    if plan.checkpoint is None:
        return 0
    return max(1, int(plan.checkpoint.interval_steps))


def save_timeout(plan: "ParallelPlan") -> float:
    """Bound on each wait of the save protocol (checkpoint.save_timeout_s or the plan's derived figure)."""
    return plan.checkpoint.save_timeout_seconds if plan.checkpoint is not None else 600.0


def as_pairs(batches: list[torch.Tensor], eos_id: int | None = None) -> list[tuple[Any, torch.Tensor]]:
    """Sequences [B, S+1] -> (tokens [B, S], targets [B, S]) shifted by one, the engine's micro-batch form;
    with ``eos_id`` (data.document_mask) the inputs are (tokens, positions) (``hpframe.data.packing``)."""
    return model_inputs(batches, eos_id)


def evaluate_loss(engine: Any, data: Data, plan: "ParallelPlan") -> float:
    """Mean held-out LM loss over this evaluation's micro-batches of every dp rank (collective).

    ``hpframe.evaluate`` calls this too, so its figure is the in-training one. A pipelined engine
    takes grad_accum micro-batches per call.
    """
    batches = as_pairs(data.eval, data.eos_id)
    chunk = plan.grad_accum if plan.pp > 1 else len(batches)
    losses = [float(engine.eval_step(batches[i : i + chunk])) for i in range(0, len(batches), chunk)]
    return sum(losses) / len(losses)


def eval_record(step: int, loss: float, data: Data, plan: "ParallelPlan") -> dict[str, Any]:
    """The metrics.jsonl line of an evaluation: loss, perplexity exp(loss), tokens it covered."""
    tokens = sum(b.shape[0] * (b.shape[1] - 1) for b in data.eval) * plan.dp
    return {"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0)), "eval_tokens": tokens}


def _resume(engine: Any, data: Data, cfg: RunConfig, root: Path, fingerprint: str,
            point: manager.ResumePoint | None = None) -> tuple[int, int, manager.ResumePoint]:
    """Load the checkpoint ``checkpoint.resume`` selects (or ``point``), if any: (step, consumed tokens, where from + line)."""
    point = point if point is not None else manager.resume_point(cfg.checkpoint.resume, root)
    if point.path is None:
        return 0, 0, point
    state = manager.load(engine, point.path, plan_fingerprint=fingerprint, checksums=not point.verified,
                         model_cfg=cfg.model)
    data.train.load_state_dict(state["data"])
    step, consumed = int(state["step"]), int(state["consumed_tokens"])
    how = "continuing its line" if point.lineage["line"] == state.get("line") else f"new line {point.lineage['line']}"
    log.info(f"resumed from {point.path}: step {step}, {consumed:,} tokens consumed ({how})")
    return step, consumed, point


def logged_steps(metrics_path: Path) -> set[int]:
    """Steps that already have a training record in ``metrics_path`` (empty when there is no file).

    A run marks its records of these steps ``rerun: true``: after a resume, the steps after the
    checkpoint that the interrupted run had already logged. A torn line (a killed writer) is ignored.
    """
    if not metrics_path.is_file():
        return set()
    steps = set()
    with metrics_path.open("rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict) and "loss" in record and isinstance(record.get("step"), int):
                steps.add(record["step"])
    return steps


def _resume_tiers(engine: Any, data: Data, cfg: RunConfig, root: Path, fingerprint: str,
                  memory: MemoryTier | None) -> tuple[int, int, manager.ResumePoint, str | None]:
    """With the fast tier on and checkpoint.resume=auto: the newest complete snapshot in host memory
    (own node, else a peer's replica) unless storage holds a newer step; otherwise ``_resume``.
    Returns (step, consumed tokens, the storage point (path None when from memory), the tier or None)."""
    found = memory.find() if memory is not None and cfg.checkpoint.resume == "auto" else None
    point = None
    if found is not None:
        point = manager.resume_point(cfg.checkpoint.resume, root)
        storage_step = store.step_of_tag(point.path.name) if point.path is not None else None
        if storage_step is None or found.step >= storage_step:
            state = memory.load(found)
            data.train.load_state_dict(state["data"])
            step, consumed = int(state["step"]), int(state["consumed_tokens"])
            log.info(f"resumed from {found.tier} (host-memory snapshot of step {step} in {memory.job}); "
                     f"newest on storage: {point.path}")
            lineage = {k: state[k] for k in ("line", "parent") if k in state} or point.lineage  # the snapshot's line
            return step, consumed, manager.ResumePoint(path=None, lineage=lineage, verified=True), found.tier
    if memory is not None:  # snapshots not resumed from are another line of training: never resume them later
        memory.clear()
    start, consumed, point = _resume(engine, data, cfg, root, fingerprint, point)
    return start, consumed, point, "storage" if point.path is not None else None


def _dropped(moe_stats: Any, from_layers: float, module: Any) -> float:
    """The engine's global figure (all ranks, micro-batches and layers of the step) when it reports one."""
    if isinstance(moe_stats, dict) and "dropped_token_frac" in moe_stats:
        return float(moe_stats["dropped_token_frac"])
    return from_layers or dropped_frac(module)


def step_record(out: Any, *, step: int, lr: float, elapsed: float, tokens: int, consumed: int, module: Any,
                plan: "ParallelPlan", cfg: RunConfig) -> dict[str, Any]:
    """The metrics.jsonl line of one step from the engine's StepResult (keys: metrics.STEP_KEYS)."""
    loss = float(out.loss)
    # the engine skips the optimizer update when the loss or the gradient norm is not finite
    bad = bool(out.skipped) or not math.isfinite(loss) or not math.isfinite(float(out.grad_norm))
    cv, dropped = summarize_moe(out.moe_stats)
    tps = tokens / elapsed
    shares = expert_shares(out.moe_stats)
    record = {
        "step": step, "loss": loss, "lm_loss": float(out.lm_loss), "aux_loss": float(out.aux_loss), "lr": lr,
        "grad_norm": float(out.grad_norm), "tokens_per_s": tps,
        "mfu": mfu(tps, plan.flops_per_token, plan.world_size, cfg.cluster.peak_tflops),
        "expert_load_cv": cv, "dropped_token_frac": _dropped(out.moe_stats, dropped, module),
        "ep_load_imbalance": summarize_ep_imbalance(out.moe_stats, plan.ep if plan.experts is not None else 1),
        "skipped": bad,
        "consumed_tokens": consumed, "step_time_s": elapsed,
    }
    if shares:  # MoE runs: each expert's share of the routed assignments (hpframe.plot draws it)
        record["expert_load"] = shares
    return record


def _check_nonfinite(record: dict[str, Any], in_a_row: int, limit: int) -> None:
    """Report a skipped step; stop the run once ``limit`` steps in a row were skipped."""
    log.warning(
        f"step {record['step']}: non-finite loss or gradients (loss {record['loss']}, grad norm {record['grad_norm']}); "
        f"step skipped ({in_a_row}/{limit} in a row)"
    )
    if in_a_row >= limit:
        raise NonFiniteLossError(
            f"{in_a_row} consecutive steps with a non-finite loss or gradients (train.max_nonfinite_steps={limit}), "
            f"last at step {record['step']}; lower train.lr or check the data"
        )


def engine_on_cuda(engine: Any) -> bool:
    """Whether the engine's parameters live on a CUDA device."""
    p = next(iter(engine.module.parameters()), None)
    return p is not None and p.is_cuda


class StepClock:
    """``step_time_s``: the period between the ends of consecutive steps, so the host's work between
    them (metrics, logging, the next batch, a garbage collection) counts, as it does for the run's
    throughput. The first step, and the first after an evaluation, a checkpoint or a written profile
    (``reset``), run from their own start."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now
        self._prev_end: float | None = None
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> float:
        end = self._now()
        elapsed = end - (self._prev_end if self._prev_end is not None else self._t0)
        self._prev_end = end
        return elapsed

    def reset(self) -> None:
        self._prev_end = None


class ManualGC:
    """``train.gc_interval``: 0 leaves Python's automatic garbage collection on; N > 0 collects once
    before training, freezes what survives (the model, the engine and the libraries are never scanned
    again), turns the automatic collection off (its pauses land anywhere in a step, also where the GPU
    waits for the host) and collects every N steps between steps; ``close`` undoes both."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._was_enabled = gc.isenabled()
        if interval > 0:
            gc.collect()
            gc.freeze()  # what exists now (model, engine, libraries) is never scanned again
            gc.disable()

    def after_step(self, step: int) -> None:
        if self.interval > 0 and step % self.interval == 0:
            gc.collect()

    def close(self) -> None:
        if self.interval > 0:
            gc.unfreeze()
            if self._was_enabled:
                gc.enable()


@dataclass
class Snap:
    """A fast-tier snapshot kept in host memory: its step, this rank's part, RNG states and client state."""

    step: int
    part: Any
    rng: dict
    client_state: dict[str, Any]


def _of_step(snap: Snap | None, step: int) -> Snap | None:
    """``snap`` if it is the snapshot of ``step`` (a save of that step then writes it without capturing)."""
    return snap if snap is not None and snap.step == step else None


def train(engine: Any, data: Data, plan: "ParallelPlan", cfg: RunConfig) -> TrainResult:
    """Run ``train.steps`` optimizer steps (resuming if asked); returns the metrics written."""
    run_dir = Path(cfg.output_dir)
    ckpt_root = Path(cfg.checkpoint.dir) if Path(cfg.checkpoint.dir).is_absolute() else run_dir / cfg.checkpoint.dir
    interval = checkpoint_interval(cfg, plan) if cfg.checkpoint.enabled else 0
    fingerprint = manager.plan_fingerprint(plan, cfg)
    tokens_per_step = plan.global_batch_size * cfg.data.seq_len
    mem_every = cfg.checkpoint.memory_interval if cfg.checkpoint.enabled else 0
    memory = (MemoryTier(engine, memory_dir=cfg.checkpoint.memory_dir, ckpt_root=ckpt_root, replicas=cfg.checkpoint.memory_replicas,
                         fingerprint=fingerprint, timeout_s=save_timeout(plan)) if mem_every > 0 else None)
    start, consumed, point, tier = _resume_tiers(engine, data, cfg, ckpt_root, fingerprint, memory)
    result = TrainResult(steps_done=start, resumed_from=memory.dir if memory is not None and tier in ("memory", "peer") else point.path,
                         resumed_tier=tier, received=memory.received if memory is not None else None)
    rank0 = current_rank() == 0
    if cfg.checkpoint.enabled:
        log.info(f"checkpoints {f'every {interval} steps and ' if interval else ''}at the end in {ckpt_root}")
        # saves killed in an earlier run left staging directories; none of this run's is in flight yet
        for stale in store.remove_staging(ckpt_root) if rank0 else []:
            log.info(f"removed {stale}, left by a save that did not finish")
    rerun = logged_steps(run_dir / "metrics.jsonl") if rank0 else set()  # steps this run logs again
    # one Checkpointer for the run: with checkpoint.async_save at most one save is in flight
    checkpointer = (
        # with the fast tier on, storage saves are written in the background from a snapshot: no stall of their own
        Checkpointer(engine, ckpt_root, keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save or mem_every > 0,
                     timeout_s=save_timeout(plan))
        if cfg.checkpoint.enabled else None
    )
    wandb = (dict(project=cfg.train.wandb_project, mode=cfg.train.wandb_mode.value, config=to_dict(cfg), name=Path(run_dir).name)
             if cfg.train.wandb else None)
    writer = MetricsWriter(run_dir, enabled=rank0, tensorboard=cfg.train.tensorboard, wandb=wandb)
    if point.path is not None:
        note_batch_change(point.path, step=start, consumed=consumed, global_batch=plan.global_batch_size,
                          seq_len=cfg.data.seq_len, writer=writer)
    stop = StopRequest(cfg.checkpoint.preempt_grace_s)  # SIGTERM / SIGINT: final checkpoint, then EXIT_PREEMPTED
    stop_device = torch.device("cuda", torch.cuda.current_device()) if engine_on_cuda(engine) else None
    progress = Progress(total=cfg.train.steps, start=start, enabled=rank0 and cfg.train.progress)
    if tier is not None:
        writer.write({"step": start, "resumed_from": tier, "resumed_step": start}, prefix="resume")
    profiler = StepProfiler(run_dir, first=cfg.train.profile_from_step, count=cfg.train.profile_num_steps,
                            rank=current_rank(), cuda=torch.cuda.is_available() and engine_on_cuda(engine),
                            with_stack=cfg.train.profile_with_stack)

    def client_state(step: int) -> dict[str, Any]:
        # RNG states are saved per rank by the checkpointer; the rest is JSON in client_state.json
        return manager.json_client_state({
            "step": step, "consumed_tokens": consumed, "data": data.train.state_dict(),
            "config": to_dict(cfg), "plan_fingerprint": fingerprint, "layout": manager.layout_of(plan),
            "global_batch_size": plan.global_batch_size, "seq_len": cfg.data.seq_len,
            **point.lineage,  # line and parent: also written into the manifest (store.py, lines)
        })

    def snapshot(step: int) -> Snap:
        """The fast tier's snapshot of ``step``; it stays in host memory for the storage saves that follow."""
        assert memory is not None
        state = copy.deepcopy(client_state(step))  # the loader's position of this step, not of a later save
        stats, part, rng = memory.snapshot(step, state)
        writer.write({"step": step, "mem_stall_s": stats.stall_s, "mem_wait_s": stats.waited_s}, prefix="memory")
        return Snap(step, part, rng, state)

    def save(step: int, snap: Snap | None = None) -> bool:
        """Checkpoint ``step`` (from ``snap``, the snapshot of that step, when given: no capture); False
        when the save failed but a later one can succeed (guards.after_failed_save)."""
        assert checkpointer is not None and (snap is None or snap.step == step)
        part, rng, state = (snap.part, snap.rng, snap.client_state) if snap is not None else (None, None, client_state(step))
        try:
            stats = checkpointer.save(step, state, part=part, rng=rng)
        except SAVE_ERRORS as err:  # disk full, permissions: go on only if a retry can work
            after_failed_save(err, step=step, root=ckpt_root, need_bytes=plan.checkpoint.bytes if plan.checkpoint else 0,
                              last_good=result.checkpoints[-1].name if result.checkpoints else None, writer=writer)
            return False
        result.checkpoints.append(stats.path)
        writer.write({"step": step, "ckpt_stall_s": stats.stall_s}, prefix="checkpoint")  # metrics.jsonl + TensorBoard
        how = "writing in the background" if checkpointer.async_save else "saved"
        log.info(f"checkpoint {stats.path}: {how}{' from the host-memory snapshot' if snap is not None else ''} "
                 f"(training stalled {stats.stall_s:.2f} s)")
        return True

    def evaluate(step: int) -> None:
        record = eval_record(step, evaluate_loss(engine, data, plan), data, plan)
        result.evals.append(record)
        writer.write(record, prefix="eval")
        log.info(f"eval step {step}: loss {record['eval_loss']:.4f}, perplexity {record['eval_ppl']:.2f} "
                 f"({record['eval_tokens']:,} held-out tokens)")

    t = cfg.train
    nonfinite, last_saved, last_eval = 0, start, -1
    newest: Snap | None = None  # the fast tier's newest snapshot, kept in host memory
    clock = StepClock()
    collector = ManualGC(t.gc_interval)
    stop.install()
    try:
        for step in range(start + 1, t.steps + 1):
            lr = lr_at(step - 1, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, total_steps=t.steps)
            engine.set_lr(lr)
            profiler.before_step(step)
            clock.start()
            out = engine.train_step(as_pairs(data.train.next_step(), data.eos_id))
            elapsed = clock.stop()
            if profiler.after_step(step):  # the trace was written: not the next step's time
                clock.reset()
            consumed += tokens_per_step
            record = step_record(out, step=step, lr=lr, elapsed=elapsed, tokens=tokens_per_step, consumed=consumed,
                                 module=engine.module, plan=plan, cfg=cfg)
            if step in rerun:  # logged before the interruption: this is the re-run of that step
                record["rerun"] = True
            result.history.append(record)
            writer.write(record)
            nonfinite = nonfinite + 1 if record["skipped"] else 0
            if record["skipped"]:
                _check_nonfinite(record, nonfinite, t.max_nonfinite_steps)
            progress.update(record, log_line=step % t.log_interval == 0 or step == t.steps)
            result.steps_done = step
            faults.maybe_fail(t.fail_at_step, step)  # restart tests only; no-op when 0
            collector.after_step(step)  # between steps, inside the next step's measured period
            if t.eval_interval and step % t.eval_interval == 0:
                evaluate(step)
                last_eval = step
                clock.reset()
            if mem_every and step % mem_every == 0:
                newest = snapshot(step)
            if interval and step % interval == 0:
                # fast tier on: the newest snapshot not yet on storage (its own step, maybe before this one)
                src = newest if newest is not None and newest.step > last_saved else None
                if save(src.step if src is not None else step, src):
                    last_saved = src.step if src is not None else step
            if (mem_every and step % mem_every == 0) or (interval and step % interval == 0):
                clock.reset()
            if stop.agreed(stop_device):  # every rank stops after the same step, saved as it is
                saved = checkpointer is not None and (last_saved == step or save(step, _of_step(newest, step)))
                raise Preempted(step, stop.signame, saved=saved)
        if result.steps_done > start and last_eval != result.steps_done:
            evaluate(result.steps_done)
        if checkpointer is not None and last_saved != result.steps_done:
            save(result.steps_done, _of_step(newest, result.steps_done))
        if memory is not None:  # the run ended and its last save is on storage: free the host memory
            memory.close(remove=True)
            memory = None
    finally:
        if memory is not None:  # an error or a preemption: the snapshots stay for the restart
            try:
                memory.close(remove=False)
            except Exception as err:  # do not hide the error that ended training
                log.warning(f"the memory snapshot in flight did not finish: {err}", all_ranks=True)
        collector.close()
        profiler.close()
        if checkpointer is not None:
            checkpointer.close()  # the last asynchronous save is committed before the process ends
        stop.uninstall()  # after the final save: the grace timer bounds it
        progress.close()
        writer.close()
    return result
