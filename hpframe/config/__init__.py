"""Configuration schema (dataclasses registered in Hydra's ConfigStore). Imports no torch."""

from hpframe.config.schema import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    PlanConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig",
    "ClusterConfig",
    "DataConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "PlanConfig",
    "RunConfig",
    "TrainConfig",
]
