"""The DeepSpeed runtime of hpframe: ``build_engine(model, plan, groups, cfg) -> Engine``."""

from hpframe.engine.ds_env import set_environment

set_environment()  # before the first DeepSpeed import below

from hpframe.engine.build import build_engine  # noqa: E402
from hpframe.engine.engine import Engine, StepResult  # noqa: E402

__all__ = ["Engine", "StepResult", "build_engine"]
