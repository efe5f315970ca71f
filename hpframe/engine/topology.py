"""hpframe's rank layout expressed in DeepSpeed's terms: a ProcessTopology (with PP) or an mpu (without).

DeepSpeed learns the layout from one of two objects:
  * with pipeline parallelism, a ``ProcessTopology`` with axes ``pipe``, ``data``, ``model`` given to
    ``PipelineModule``; DeepSpeed builds its ``PipelineParallelGrid`` (and its own groups) from it;
  * without, an "mpu" object whose ``get_*_group/rank/world_size`` methods DeepSpeed calls.
Both are derived here from ``plan.ranks`` and nothing else, and ``check_topology`` compares every
rank list DeepSpeed will use with the plan's (pure, no processes).

Conventions: ``ProcessTopology`` is row-major with the innermost axis LAST, the same as
``RankLayout.axis_order`` (outermost first). hpframe's axis names map as pp->pipe, dp->data,
tp->model. DeepSpeed's "model parallel" group means tp x pp for the mpu but tp only ("slice") for
the pipeline grid; ``PlanMPU`` answers model-parallel queries with tp because pp == 1 there.
"""

from __future__ import annotations

from typing import Any

from deepspeed.runtime.pipe.topology import ProcessTopology

DS_AXIS = {"pp": "pipe", "dp": "data", "tp": "model"}
"""hpframe dense axis -> DeepSpeed ProcessTopology axis name."""


def process_topology(plan: Any) -> ProcessTopology:
    """The ``ProcessTopology`` whose rank of (pipe, data, model) equals the plan's rank of (pp, dp, tp)."""
    layout = plan.ranks
    sizes = {"pp": layout.pp, "dp": layout.dp, "tp": layout.tp}
    axes = [DS_AXIS[a] for a in layout.axis_order]
    return ProcessTopology(axes=axes, dims=[sizes[a] for a in layout.axis_order])


def topology_rank_lists(topo: ProcessTopology) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Groups of each dense hpframe axis as DeepSpeed's topology computes them, sorted like plan.ranks.groups."""
    out = {}
    for ours, theirs in DS_AXIS.items():
        lists = topo.get_axis_comm_lists(theirs) if topo.get_dim(theirs) > 1 else [[r] for r in range(topo.world_size())]
        out[ours] = tuple(sorted(tuple(sorted(g)) for g in lists))
    return out


def check_topology(plan: Any, topo: ProcessTopology | None = None) -> None:
    """Raise ValueError unless DeepSpeed's view of every rank equals the plan's (coords and groups)."""
    topo = topo or process_topology(plan)
    layout = plan.ranks
    for rank in range(layout.world_size):
        c, d = layout.coords(rank), topo.get_coord(rank)
        theirs = {"pp": d.pipe, "dp": d.data, "tp": d.model}
        if any(c[a] != theirs[a] for a in DS_AXIS):
            raise ValueError(f"rank {rank}: plan coordinates {c} differ from DeepSpeed's topology {d}")
    ds_lists = topology_rank_lists(topo)
    for axis in DS_AXIS:
        ours = tuple(sorted(layout.groups(axis)))
        if ours != ds_lists[axis]:
            raise ValueError(f"{axis} groups differ: plan {ours}, DeepSpeed topology {ds_lists[axis]}")


class PlanMPU:
    """The "mpu" DeepSpeed queries when there is no pipeline: tensor/data/model-parallel groups of one rank.

    ``groups`` is the rank's ``ParallelGroups`` (process-group handles); it may be None in pure tests,
    where only sizes, ranks and rank lists are available. With pp == 1 the model-parallel group is the
    tensor-parallel group.
    """

    def __init__(self, plan: Any, rank: int, groups: Any | None = None) -> None:
        if plan.pp != 1:
            raise ValueError(f"PlanMPU serves pp == 1 only (parallel.pp={plan.pp}); pipelines use the ProcessTopology")
        self._plan, self._rank, self._groups = plan, rank, groups
        self._coords = plan.ranks.coords(rank)

    def _group(self, axis: str) -> Any:
        if self._groups is None:
            raise RuntimeError("PlanMPU was built without process groups")
        return self._groups.group(axis)

    # tensor parallel == model parallel (pp == 1)
    def get_tensor_model_parallel_group(self) -> Any:
        return self._group("tp")

    def get_tensor_model_parallel_rank(self) -> int:
        return self._coords["tp"]

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._plan.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._plan.ranks.group("tp", self._rank)[0]

    get_model_parallel_group = get_tensor_model_parallel_group
    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_model_parallel_src_rank = get_tensor_model_parallel_src_rank

    # data parallel
    def get_data_parallel_group(self) -> Any:
        return self._group("dp")

    def get_data_parallel_rank(self) -> int:
        return self._coords["dp"]

    def get_data_parallel_world_size(self) -> int:
        return self._plan.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._plan.ranks.group("dp", self._rank))

    # pipeline (a single stage)
    def get_pipeline_model_parallel_group(self) -> Any:
        return self._group("pp")

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def is_pipeline_first_stage(self) -> bool:
        return True

    def is_pipeline_last_stage(self) -> bool:
        return True
