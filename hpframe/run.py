"""The data-flow line of hpframe, one call per arrow (see docs/design.md)."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from hpframe.config.convert import to_run_config
from hpframe.config.schema import PlanFormat, RunConfig


def main_from_hydra(cfg: DictConfig) -> int:
    """Hydra entry: convert, fill in the run directory, run. Returns the process exit code."""
    from hydra.core.hydra_config import HydraConfig

    run_cfg = to_run_config(cfg)
    if HydraConfig.initialized():
        run_cfg.output_dir = HydraConfig.get().runtime.output_dir
    return main(run_cfg)


def main(cfg: RunConfig) -> int:
    """Plan, then (unless a dry run) train. Returns 0 on success, 2 on a user error."""
    from hpframe.plan import PlanError, make_plan
    from hpframe.plan.report import render_json, render_table

    try:
        plan = make_plan(cfg)
    except PlanError as err:
        print(f"hpframe: invalid configuration: {err}", file=sys.stderr)
        return 2
    if cfg.plan.dry_run:
        print(render_json(plan, cfg) if cfg.plan.format == PlanFormat.json else render_table(plan, cfg))
        return 0
    raise NotImplementedError("training is not wired yet")
