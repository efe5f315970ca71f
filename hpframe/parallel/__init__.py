"""Runtime side of the plan: process groups, tensor and expert parallelism, activation checkpointing.

With engine/ and checkpoint/, the only code that imports torch.distributed. Entry points:
``init_distributed(plan) -> ParallelGroups`` and ``parallelize(model, plan, groups) -> model``.
"""

from hpframe.parallel.groups import AXES, ParallelGroups, build_groups, build_groups_from_ranks
from hpframe.parallel.init import init_distributed
from hpframe.parallel.parallelize import parallelize
from hpframe.parallel.tensor import vocab_parallel_cross_entropy

__all__ = [
    "AXES",
    "ParallelGroups",
    "build_groups",
    "build_groups_from_ranks",
    "init_distributed",
    "parallelize",
    "vocab_parallel_cross_entropy",
]
