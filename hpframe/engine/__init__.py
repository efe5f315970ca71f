"""The DeepSpeed runtime of hpframe: ``build_engine(model, plan, groups, cfg) -> Engine``."""

from hpframe.engine.build import build_engine
from hpframe.engine.engine import Engine, StepResult

__all__ = ["Engine", "StepResult", "build_engine"]
