"""make_plan: RunConfig (+ world size) -> ParallelPlan. Pure: no torch, no processes, no environment."""

from __future__ import annotations

from hpframe.config.schema import RunConfig
from hpframe.plan.assemble import assemble_plan
from hpframe.plan.errors import MemoryRefusal
from hpframe.plan.suggest import SUGGEST_COMMAND, fit_hint, fitting_keys
from hpframe.plan.types import ParallelPlan


def make_plan(cfg: RunConfig, world_size: int | None = None) -> ParallelPlan:
    """The plan of ``cfg``: degrees, batch, rank layout, pipeline, experts and estimates (``assemble_plan``).

    ``world_size`` defaults to cluster.nodes * cluster.gpus_per_node (tp*pp*dp for gpus_per_node=-1).
    Raises PlanError, naming keys and numbers, on any impossible or unsafe combination. A plan over
    cluster.gpu_memory_gb (plan.memory_check=true) is refused as MemoryRefusal with up to three sets of
    overrides under which the same world size fits, found by the search that plan.suggest=true runs
    (docs/planner.md, "Layout suggestions"; ``values["settings_that_fit"]``).
    """
    try:
        return assemble_plan(cfg, world_size)
    except MemoryRefusal as err:
        keys = fitting_keys(cfg, err.values["device_bytes"], err.values["world_size"])
        hint = fit_hint(keys, suggest_command=SUGGEST_COMMAND + " plan.memory_check=false")
        raise MemoryRefusal(f"{err}; {hint}, or set plan.memory_check=false to plan it anyway", key=err.key,
                            values={**err.values, "settings_that_fit": keys}) from None
