"""Layout suggestion (plan.suggest=true): enumerate tp/pp/ep/dp/ZeRO/recompute choices that pass every
check and fit device memory, at the current global batch, and rank them by estimated step time.

tp stays inside a node (tp <= gpus per node) and runs over divisors of the world size; pp over
divisors up to num_layers; ep over divisors of dp that divide num_experts; ZeRO stages the DeepSpeed
engine accepts for the combination; recompute none/selective/full. Every candidate is a full
plan (``assemble_plan``: ``make_plan`` less the search for settings that fit), so its estimates are
the same ones the dry run shows.

``fitting_keys`` turns the suggestions into the overrides that a memory refusal names (make_plan's own,
and the one against a GPU's real free memory when training starts: hpframe/machine.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from hpframe.config.schema import DType, Recompute, RunConfig
from hpframe.plan.assemble import assemble_plan
from hpframe.plan.errors import PlanError
from hpframe.plan.memory import GIB
from hpframe.plan.types import ParallelPlan
from hpframe.plan.validate import needs_zero_optimizer


@dataclass(frozen=True, slots=True)
class Suggestion:
    tp: int
    pp: int
    dp: int
    ep: int
    zero_stage: int
    recompute: str
    memory_bytes: int
    step_seconds: float
    compute_seconds: float
    comm_seconds: float


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_layouts(cfg: RunConfig, plan: ParallelPlan, limit: int = 10) -> list[Suggestion]:
    """Up to ``limit`` layouts that fit memory, fastest estimated step first (ties: less memory)."""
    world, gpn = plan.world_size, plan.gpus_per_node
    base = copy.deepcopy(cfg)
    base.plan.memory_check = True
    base.plan.suggest = False
    base.parallel.global_batch_size = plan.global_batch_size
    base.parallel.grad_accum = -1
    base.parallel.dp = -1
    base.parallel.pipeline_layout = []
    experts = cfg.moe.num_experts
    out: list[Suggestion] = []
    zero_at_dp1 = needs_zero_optimizer(base)  # ZeRO 1 also at dp = 1 (and ZeRO 0 refused by make_plan)
    for tp in (d for d in _divisors(world) if d <= gpn):
        for pp in (d for d in _divisors(world // tp) if d <= cfg.model.num_layers):
            dp = world // (tp * pp)
            eps = [e for e in _divisors(dp) if experts and experts % e == 0] or [1]
            for ep in eps:
                for zero in (0, 1, 2):
                    if (pp > 1 and zero > 1) or (zero > 0 and dp == 1 and not zero_at_dp1):
                        continue
                    for rc in (Recompute.none, Recompute.selective, Recompute.full):
                        c = copy.deepcopy(base)
                        c.parallel.tp, c.parallel.pp, c.parallel.ep, c.parallel.zero_stage, c.parallel.recompute = tp, pp, ep, zero, rc
                        try:
                            p = assemble_plan(c, world_size=world)
                        except PlanError:
                            continue
                        assert p.memory is not None and p.time is not None
                        out.append(Suggestion(tp, pp, dp, ep, zero, rc.value, p.memory.total, p.time.step_seconds,
                                              p.time.compute_seconds, p.time.comm_seconds))
                        break  # the cheapest recompute policy that fits; heavier ones only add compute
    best: dict[tuple[int, int, int], Suggestion] = {}
    for s in out:  # one entry per (tp, pp, ep): its fastest, then leanest, ZeRO/recompute choice
        key = (s.tp, s.pp, s.ep)
        if key not in best or (s.step_seconds, s.memory_bytes) < (best[key].step_seconds, best[key].memory_bytes):
            best[key] = s
    return sorted(best.values(), key=lambda s: (s.step_seconds, s.memory_bytes))[:limit]


SUGGEST_COMMAND = "python launch.py ... plan.suggest=true plan.dry_run=true"
"""How a user lists more layouts than a refusal names (docs/planner.md, "Layout suggestions")."""


def fitting_keys(cfg: RunConfig, capacity_bytes: int, world_size: int, limit: int = 3) -> list[str]:
    """Overrides (``key=value ...``) under which the plan fits ``capacity_bytes`` per device, fastest step first.

    Each option is one ``suggest_layouts`` layout on ``world_size`` GPUs, written as the parallel.* keys
    that differ from ``cfg``; bf16 training with fp32 master weights also tries train.master_dtype=bf16.
    """
    options: list[str] = []
    trial = copy.deepcopy(cfg)
    trial.cluster.gpu_memory_gb = capacity_bytes / GIB
    trial.plan.memory_check = False  # cfg's own layout need not fit: the search starts from its plan
    variants = [([], trial)]
    if cfg.train.dtype == DType.bf16 and cfg.train.master_dtype == DType.fp32:
        bf16_master = copy.deepcopy(trial)
        bf16_master.train.master_dtype = DType.bf16
        variants.append((["train.master_dtype=bf16"], bf16_master))
    for extra, c in variants:
        try:
            layouts = suggest_layouts(c, assemble_plan(c, world_size=world_size), limit=limit)
        except PlanError:
            continue
        for s in layouts:
            chosen = {"tp": s.tp, "pp": s.pp, "ep": s.ep, "zero_stage": s.zero_stage, "recompute": s.recompute}
            keys = [*extra, *(f"parallel.{k}={v}" for k, v in chosen.items() if _value(cfg, k) != str(v))]
            if keys and " ".join(keys) not in options:
                options.append(" ".join(keys))
    return options[:limit]


def _value(cfg: RunConfig, name: str) -> str:
    """parallel.NAME of ``cfg`` as a string (enums by value)."""
    value = getattr(cfg.parallel, name)
    return str(getattr(value, "value", value))


def fit_hint(keys: list[str], *, suggest_command: str = SUGGEST_COMMAND) -> str:
    """The clause of a memory refusal that names ``keys`` (from ``fitting_keys``), or says nothing fits."""
    if not keys:
        return "no layout of this world size fits: use more GPUs (cluster.nodes, cluster.gpus_per_node) or a smaller model"
    return "settings that fit: " + "; ".join(keys) + f" ({suggest_command} lists more)"
