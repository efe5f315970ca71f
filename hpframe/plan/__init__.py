"""The planner: RunConfig -> ParallelPlan, pure data (imports no torch, reads no environment, starts nothing)."""

from hpframe.plan.errors import PlanError
from hpframe.plan.planner import make_plan
from hpframe.plan.ranks import RankLayout
from hpframe.plan.types import ExpertPlan, ParallelPlan, PipelinePlan, StagePlan

__all__ = ["ExpertPlan", "ParallelPlan", "PipelinePlan", "PlanError", "RankLayout", "StagePlan", "make_plan"]
