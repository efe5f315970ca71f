"""Resolve the world size, the parallel degrees and the batch shape; refuse impossible combinations."""

from __future__ import annotations

from dataclasses import dataclass

from hpframe.config.schema import RunConfig
from hpframe.plan.errors import PlanError


@dataclass(frozen=True, slots=True)
class Degrees:
    world_size: int
    gpus_per_node: int
    num_nodes: int
    tp: int
    pp: int
    dp: int
    ep: int
    zero_stage: int

    @property
    def edp(self) -> int:
        return self.dp // self.ep


@dataclass(frozen=True, slots=True)
class Batch:
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise PlanError(f"{key}={value} must be >= 1", key=key, values={key: value})


def resolve_degrees(cfg: RunConfig, world_size: int | None = None) -> Degrees:
    """Degrees with dp=-1 resolved; world_size defaults to cluster.nodes * cluster.gpus_per_node,
    or tp*pp*dp (dp=-1 -> 1) when cluster.gpus_per_node=-1 (local runs)."""
    p, c = cfg.parallel, cfg.cluster
    for key, v in (("parallel.tp", p.tp), ("parallel.pp", p.pp), ("parallel.ep", p.ep), ("cluster.nodes", c.nodes)):
        _positive(key, v)
    if p.dp != -1:
        _positive("parallel.dp", p.dp)
    if p.zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"parallel.zero_stage={p.zero_stage} must be 0, 1, 2 or 3", key="parallel.zero_stage", values={"parallel.zero_stage": p.zero_stage})
    if c.gpus_per_node != -1:
        _positive("cluster.gpus_per_node", c.gpus_per_node)
    if world_size is None:
        world_size = c.nodes * c.gpus_per_node if c.gpus_per_node > 0 else p.tp * p.pp * max(p.dp, 1)
    _positive("world_size", world_size)
    if c.gpus_per_node > 0:
        gpn = c.gpus_per_node
    else:
        if world_size % c.nodes:
            raise PlanError(
                f"world size {world_size} does not split over cluster.nodes={c.nodes} (cluster.gpus_per_node=-1)",
                key="cluster.nodes",
                values={"world_size": world_size, "cluster.nodes": c.nodes},
            )
        gpn = world_size // c.nodes
    mp = p.tp * p.pp
    if world_size % mp:
        raise PlanError(
            f"parallel.tp * parallel.pp = {p.tp} * {p.pp} = {mp} does not divide the world size {world_size}",
            key="parallel.tp, parallel.pp",
            values={"parallel.tp": p.tp, "parallel.pp": p.pp, "world_size": world_size},
        )
    dp = world_size // mp if p.dp == -1 else p.dp
    if p.tp * p.pp * dp != world_size:
        raise PlanError(
            f"parallel.tp * parallel.pp * parallel.dp = {p.tp} * {p.pp} * {dp} = {p.tp * p.pp * dp} != world size {world_size}"
            f" (cluster {c.name}: {c.nodes} nodes x {gpn}); set parallel.dp=-1 to derive it",
            key="parallel.tp, parallel.pp, parallel.dp",
            values={"parallel.tp": p.tp, "parallel.pp": p.pp, "parallel.dp": dp, "world_size": world_size},
        )
    if dp % p.ep:
        raise PlanError(
            f"parallel.ep={p.ep} does not divide parallel.dp={dp}: expert parallelism borrows ranks from data parallelism",
            key="parallel.ep, parallel.dp",
            values={"parallel.ep": p.ep, "parallel.dp": dp},
        )
    return Degrees(world_size, gpn, -(-world_size // gpn), p.tp, p.pp, dp, p.ep, p.zero_stage)


def resolve_batch(cfg: RunConfig, d: Degrees, warnings: list[str]) -> Batch:
    """global = micro * dp * grad_accum, with -1 fields derived (grad_accum defaults to pp, the
    fewest micro-batches that fill a 1F1B pipeline)."""
    p = cfg.parallel
    micro, gbs, ga = p.micro_batch_size, p.global_batch_size, p.grad_accum
    _positive("parallel.micro_batch_size", micro)
    if ga != -1:
        _positive("parallel.grad_accum", ga)
    if gbs != -1:
        _positive("parallel.global_batch_size", gbs)
    per_step = micro * d.dp
    if gbs == -1:
        ga = d.pp if ga == -1 else ga
        gbs = per_step * ga
    elif ga == -1:
        if gbs % per_step:
            raise PlanError(
                f"parallel.global_batch_size={gbs} is not divisible by parallel.micro_batch_size * dp = {micro} * {d.dp} = {per_step}",
                key="parallel.global_batch_size, parallel.micro_batch_size, parallel.dp",
                values={"parallel.global_batch_size": gbs, "parallel.micro_batch_size": micro, "parallel.dp": d.dp},
            )
        ga = gbs // per_step
    elif gbs != per_step * ga:
        raise PlanError(
            f"parallel.global_batch_size={gbs} != micro_batch_size * dp * grad_accum = {micro} * {d.dp} * {ga} = {per_step * ga}",
            key="parallel.global_batch_size, parallel.grad_accum",
            values={"parallel.global_batch_size": gbs, "parallel.micro_batch_size": micro, "parallel.dp": d.dp, "parallel.grad_accum": ga},
        )
    if d.pp > 1 and ga < d.pp:
        warnings.append(
            f"parallel.grad_accum={ga} < parallel.pp={d.pp}: the pipeline never fills; "
            f"bubble fraction {(d.pp - 1) / (ga + d.pp - 1):.0%}"
        )
    return Batch(micro, ga, gbs)
