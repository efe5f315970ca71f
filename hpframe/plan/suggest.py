"""Layout suggestion (plan.suggest=true): enumerate tp/pp/ep/dp/ZeRO/recompute choices that pass every
check and fit device memory, at the current global batch, and rank them by estimated step time.

tp stays inside a node (tp <= gpus per node) and runs over divisors of the world size; pp over
divisors up to num_layers; ep over divisors of dp that divide num_experts; ZeRO stages the DeepSpeed
engine accepts for the combination; recompute none/selective/full. Every candidate is a full
``make_plan``, so its estimates are the same ones the dry run shows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from hpframe.config.schema import Recompute, RunConfig
from hpframe.plan.errors import PlanError
from hpframe.plan.planner import make_plan
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
                            p = make_plan(c, world_size=world)
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
