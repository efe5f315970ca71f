"""ParallelGroups: the torch.distributed process groups of one rank, built from the plan's rank lists.

The plan (``hpframe.plan``) decides which ranks form each group; this module only turns those lists
into process groups and checks the result. Groups travel as an explicit ``ParallelGroups`` argument
(a frozen dataclass): nothing here is stored in module globals, and no layer creates or looks up its
own group.

Axes (see docs/design.md, "Rank layout"):
  tp   tensor parallel (innermost by default: consecutive ranks of one node)
  pp   pipeline stages
  dp   data parallel (replicas of the dense weights)
  ep   expert parallel: ``ep`` consecutive dp coordinates that split the experts among them
  edp  expert data parallel: replicas of the same experts (dp // ep ranks)
  mp   model parallel (tp x pp)
  embedding  first and last pipeline stage of one (dp, tp) column (tied embeddings with pp > 1)

``torch.distributed.new_group`` is collective over the whole world: every rank must call it for
every group, in the same order, even for groups it is not a member of. ``build_groups_from_ranks``
does exactly that, axis by axis in ``AXES`` order and group by group in the plan's order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

AXES: tuple[str, ...] = ("tp", "pp", "dp", "ep", "edp", "mp", "embedding")
"""Every axis a ParallelGroups carries, in the order groups are created on every rank."""

RankLists = Mapping[str, Sequence[Sequence[int]]]


@dataclass(frozen=True, eq=False)
class ParallelGroups:
    """The process groups of this rank, one per axis, plus the member ranks of each.

    ``ranks[axis]`` is the (ordered) tuple of global ranks in this rank's group along ``axis``;
    a group's local rank is the position of this rank in that tuple. ``embedding`` is ``None``
    when this rank belongs to no embedding group (no tied embeddings across pipeline stages).
    Compared and hashed by identity (it is a bundle of handles).
    """

    rank: int
    world_size: int
    tp: Any
    pp: Any
    dp: Any
    ep: Any
    edp: Any
    mp: Any
    embedding: Any | None
    ranks: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def group(self, axis: str) -> Any:
        """The process group along ``axis`` (one of ``AXES``)."""
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; expected one of {AXES}")
        return getattr(self, axis)

    def size(self, axis: str) -> int:
        """Number of ranks in this rank's group along ``axis`` (0 for an absent embedding group)."""
        return len(self.ranks.get(axis, ()))

    def local_rank(self, axis: str) -> int:
        """Position of this rank inside its group along ``axis``."""
        members = self.ranks.get(axis, ())
        if self.rank not in members:
            raise ValueError(f"rank {self.rank} is in no {axis} group (members {members})")
        return members.index(self.rank)

    @property
    def tp_rank(self) -> int:
        return self.local_rank("tp")

    @property
    def ep_size(self) -> int:
        return self.size("ep")

    @property
    def ep_rank(self) -> int:
        return self.local_rank("ep")

    @property
    def dp_rank(self) -> int:
        return self.local_rank("dp")


def _check_partition(axis: str, groups: Sequence[Sequence[int]], world_size: int) -> None:
    """Internal invariant of the plan: the groups of one axis partition the world (embedding: disjoint)."""
    seen = [r for g in groups for r in g]
    assert len(seen) == len(set(seen)), f"{axis} groups overlap: {groups}"
    assert all(0 <= r < world_size for r in seen), f"{axis} groups name ranks outside 0..{world_size - 1}: {groups}"
    if axis != "embedding":
        assert len(seen) == world_size, f"{axis} groups do not cover the world of {world_size}: {groups}"


def build_groups_from_ranks(rank_lists: RankLists) -> ParallelGroups:
    """Create every group of ``rank_lists`` (axis -> all groups of that axis) and keep this rank's.

    Collective: every rank of the default group must call this with identical ``rank_lists``.
    Each rank then checks that ``dist.get_process_group_ranks`` of its groups equals the lists.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_groups needs an initialized torch.distributed (call init_distributed first)")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    missing = [a for a in AXES if a not in rank_lists]
    if missing:
        raise ValueError(f"rank lists lack axes {missing}; expected all of {AXES}")
    mine: dict[str, Any] = {}
    members: dict[str, tuple[int, ...]] = {}
    for axis in AXES:
        groups = [tuple(int(r) for r in g) for g in rank_lists[axis]]
        _check_partition(axis, groups, world_size)
        for ranks in groups:
            pg = dist.new_group(list(ranks))  # collective: every rank, every group, same order
            if rank in ranks:
                mine[axis], members[axis] = pg, ranks
    for axis in AXES:
        if axis == "embedding" and axis not in mine:
            continue
        if axis not in mine:
            raise ValueError(f"rank {rank} is in none of the {axis} groups {list(rank_lists[axis])}")
        actual = tuple(dist.get_process_group_ranks(mine[axis]))
        if actual != members[axis]:
            raise ValueError(f"rank {rank}: {axis} process group has ranks {actual}, the plan says {members[axis]}")
    return ParallelGroups(
        rank=rank,
        world_size=world_size,
        tp=mine["tp"],
        pp=mine["pp"],
        dp=mine["dp"],
        ep=mine["ep"],
        edp=mine["edp"],
        mp=mine["mp"],
        embedding=mine.get("embedding"),
        ranks=members,
    )


def plan_rank_lists(plan: Any) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Every group of every axis from ``plan.ranks`` (a RankLayout), in the plan's order."""
    return {axis: tuple(tuple(g) for g in plan.ranks.groups(axis)) for axis in AXES}


def build_groups(plan: Any) -> ParallelGroups:
    """Create every process group of ``plan`` (tp, pp, dp, ep, edp, mp, embedding) on every rank.

    Raises ValueError if the world size differs from ``plan.world_size`` or if a group built here
    does not hold exactly the ranks the plan lists.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else None
    if world_size != plan.world_size:
        raise ValueError(f"torch.distributed world size is {world_size}, but the plan needs {plan.world_size} ranks")
    groups = build_groups_from_ranks(plan_rank_lists(plan))
    coords = plan.ranks.coords(groups.rank)
    for axis in ("tp", "dp", "ep"):
        if groups.local_rank(axis) != coords[axis]:
            raise ValueError(
                f"rank {groups.rank}: position {groups.local_rank(axis)} in its {axis} group differs from "
                f"the plan's {axis} coordinate {coords[axis]}"
            )
    return groups
