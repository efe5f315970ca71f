"""RankLayout: which global ranks form each parallel group, computed from sizes alone (no processes).

The dense grid has three axes ``pp``, ``dp``, ``tp``; ``axis_order`` lists them outermost first and
rank = sum(coord[a] * stride[a]) with the innermost axis at stride 1 (row-major, like
``torch.distributed.device_mesh`` and DeepSpeed's ``ProcessTopology``; Megatron writes its order
string the other way round). Expert parallelism borrows ranks from data parallelism: the dp
coordinate splits as ``dp = edp * ep + ep_rank``, so an EP group is ``ep`` neighbouring dp
coordinates and the expert-data-parallel group (replicas of the same experts) strides over them.
Dense and expert grids therefore share their pipeline groups.

Worked example: tp=2, pp=2, dp=2 (world 8), order pp-dp-tp, so strides pp=4, dp=2, tp=1::

    rank:  0  1  2  3  4  5  6  7
    pp:    0  0  0  0  1  1  1  1
    dp:    0  0  1  1  0  0  1  1
    tp:    0  1  0  1  0  1  0  1
    tp groups (0,1) (2,3) (4,5) (6,7); dp groups (0,2) (1,3) (4,6) (5,7); pp groups (0,4) (1,5) (2,6) (3,7)

Groups are computed on demand, so a 2,048-rank layout costs nothing until asked.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hpframe.plan.errors import PlanError

DENSE_AXES = ("pp", "dp", "tp")
AXES = ("tp", "pp", "dp", "ep", "edp", "mp", "embedding")
# Each named axis varies these atomic coordinates (dp itself is the pair ep x edp).
_ATOMS: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "pp": ("pp",),
    "dp": ("edp", "ep"),
    "ep": ("ep",),
    "edp": ("edp",),
    "mp": ("pp", "tp"),
}


def parse_axis_order(order: str) -> tuple[str, str, str]:
    """``"pp-dp-tp"`` -> ``("pp", "dp", "tp")``; raises PlanError unless it permutes pp, dp, tp."""
    axes = tuple(a.strip() for a in order.split("-"))
    if sorted(axes) != sorted(DENSE_AXES):
        raise PlanError(
            f"parallel.axis_order={order!r} must list pp, dp and tp once each, outermost first (e.g. 'pp-dp-tp')",
            key="parallel.axis_order",
            values={"parallel.axis_order": order},
        )
    return axes  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class RankLayout:
    """Rank lists of every parallel axis, and the node of every rank."""

    tp: int
    pp: int
    dp: int
    ep: int
    axis_order: tuple[str, str, str]
    """Dense axes, outermost first."""
    gpus_per_node: int
    """Ranks per node; nodes hold consecutive ranks."""

    def __post_init__(self) -> None:
        assert min(self.tp, self.pp, self.dp, self.ep, self.gpus_per_node) >= 1
        assert self.dp % self.ep == 0, "ep must divide dp (checked by the planner first)"
        assert sorted(self.axis_order) == sorted(DENSE_AXES)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: replicas of one expert shard."""
        return self.dp // self.ep

    @property
    def num_nodes(self) -> int:
        return -(-self.world_size // self.gpus_per_node)

    def _sizes(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp, "dp": self.dp}

    def strides(self) -> dict[str, int]:
        """Stride of each dense axis in the global rank (innermost axis: 1)."""
        sizes, out, s = self._sizes(), {}, 1
        for axis in reversed(self.axis_order):
            out[axis] = s
            s *= sizes[axis]
        return out

    def rank_of(self, *, tp: int, pp: int, dp: int) -> int:
        """Global rank at these dense coordinates."""
        st = self.strides()
        return tp * st["tp"] + pp * st["pp"] + dp * st["dp"]

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of ``rank``: keys tp, pp, dp, ep, edp."""
        self._check_rank(rank)
        sizes, st = self._sizes(), self.strides()
        c = {a: (rank // st[a]) % sizes[a] for a in DENSE_AXES}
        c["ep"] = c["dp"] % self.ep
        c["edp"] = c["dp"] // self.ep
        return c

    def node_of(self, rank: int) -> int:
        """Node holding ``rank`` (nodes hold ``gpus_per_node`` consecutive ranks)."""
        self._check_rank(rank)
        return rank // self.gpus_per_node

    def nodes_of(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        """Distinct nodes spanned by ``ranks``, ascending."""
        return tuple(sorted({r // self.gpus_per_node for r in ranks}))

    def group(self, axis: str, rank: int) -> tuple[int, ...]:
        """The group of ``rank`` along ``axis``, ascending.

        ``axis`` is one of tp, pp, dp, ep, edp, mp (tp x pp), embedding, or a combination of
        tp/pp/dp/ep/edp joined by '-' (e.g. ``"tp-dp"``, ``"pp-ep"``) meaning all ranks that differ
        only along those axes. The embedding group of a first- or last-stage rank is the pair
        (first stage, last stage) of its dp/tp column; middle-stage ranks (and all ranks when
        pp == 1) are alone in theirs, so the embedding groups still partition the world.
        """
        c = self.coords(rank)
        if axis == "embedding":
            if self.pp == 1 or c["pp"] not in (0, self.pp - 1):
                return (rank,)
            return (self.rank_of(tp=c["tp"], pp=0, dp=c["dp"]), self.rank_of(tp=c["tp"], pp=self.pp - 1, dp=c["dp"]))
        atoms = self._atoms(axis)
        ranges = {"tp": self.tp, "pp": self.pp, "ep": self.ep, "edp": self.edp}
        varied = [a for a in ("tp", "pp", "ep", "edp") if a in atoms]
        out = []
        for values in itertools.product(*(range(ranges[a]) for a in varied)):
            x = dict(c)
            x.update(zip(varied, values))
            out.append(self.rank_of(tp=x["tp"], pp=x["pp"], dp=x["edp"] * self.ep + x["ep"]))
        return tuple(sorted(out))

    def groups(self, axis: str) -> tuple[tuple[int, ...], ...]:
        """All groups along ``axis``, ordered by their lowest rank; together they partition the world."""
        seen: set[int] = set()
        out = []
        for r in range(self.world_size):
            if r not in seen:
                g = self.group(axis, r)
                seen.update(g)
                out.append(g)
        return tuple(out)

    def _atoms(self, axis: str) -> set[str]:
        atoms: set[str] = set()
        for part in axis.split("-"):
            if part not in _ATOMS:
                raise ValueError(f"unknown axis {part!r} in {axis!r}; expected one of {', '.join(AXES)} or a '-' combination")
            atoms.update(_ATOMS[part])
        return atoms

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
