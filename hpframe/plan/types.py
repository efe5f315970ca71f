"""The plan as data: frozen dataclasses produced by ``make_plan`` and read by the runtime and the report."""

from __future__ import annotations

from dataclasses import dataclass, field

from hpframe.plan.params import ParamCounts
from hpframe.plan.ranks import RankLayout


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One pipeline stage: the transformer blocks it runs, and whether it holds embedding/head."""

    index: int
    layers: tuple[int, ...]
    has_embedding: bool
    has_head: bool
    cost: float
    """Relative compute cost used for balancing (forward FLOPs per token, embedding counted; see pipeline.py)."""


@dataclass(frozen=True, slots=True)
class PipelinePlan:
    stages: tuple[StagePlan, ...]
    manual: bool
    """True when parallel.pipeline_layout fixed the partition."""

    def stage_of_layer(self, layer: int) -> int:
        """Index of the stage that runs block ``layer``."""
        for s in self.stages:
            if layer in s.layers:
                return s.index
        raise ValueError(f"layer {layer} is not in any stage (num_layers={sum(len(s.layers) for s in self.stages)})")

    @property
    def layers_per_stage(self) -> tuple[int, ...]:
        return tuple(len(s.layers) for s in self.stages)


@dataclass(frozen=True, slots=True)
class ExpertPlan:
    """Where routed experts live. Experts are split into contiguous slices, one per EP rank."""

    num_experts: int
    ep: int
    experts_per_rank: int
    routing_groups: int
    """Groups for node-limited routing: nodes spanned by one EP group when > 1, else moe.num_expert_groups.
    Expert e belongs to group e // (num_experts // routing_groups)."""
    max_groups_per_token: int
    """0 = unlimited."""
    ranks_per_node_in_ep_group: int
    """EP ranks of one EP group on each node it spans (ep when it fits one node)."""
    dispatch: str = "tokens"
    """How the MoE layers reach their experts: "tokens" (all-to-all) or "experts" (fetch the weights);
    moe.dispatch=auto is resolved here by the planner (hpframe/plan/dispatch.py)."""

    def local_experts(self, ep_rank: int) -> range:
        """Global ids of the experts held by ``ep_rank`` (contiguous, ascending)."""
        if not 0 <= ep_rank < self.ep:
            raise ValueError(f"ep_rank {ep_rank} outside 0..{self.ep - 1}")
        return range(ep_rank * self.experts_per_rank, (ep_rank + 1) * self.experts_per_rank)

    def ep_rank_of(self, expert: int) -> int:
        """EP rank (position inside any EP group) holding global expert ``expert``."""
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} outside 0..{self.num_experts - 1}")
        return expert // self.experts_per_rank

    def routing_group_of(self, expert: int) -> int:
        return expert // (self.num_experts // self.routing_groups)

    def placement(self, ranks: RankLayout, rank: int) -> tuple[tuple[int, int], ...]:
        """For every expert id, (global rank, node) holding it inside the EP group of ``rank``."""
        group = ranks.group("ep", rank)
        return tuple((group[self.ep_rank_of(e)], ranks.node_of(group[self.ep_rank_of(e)])) for e in range(self.num_experts))


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes per GPU on the worst rank (the stage with the largest total)."""

    stage: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    params_on_rank: int
    per_stage_total: tuple[int, ...]
    device_bytes: int
    fetched_experts: int = 0
    """moe.dispatch=experts: fetched expert weights kept for backward and their transient full gradients."""
    load_host_peak: int = 0
    """model.from_hf: host memory the worst rank adds while streaming the checkpoint into its shards (its
    parameters in fp32, as built before the engine casts them, plus the largest single slice it reads); 0 otherwise.
    Not part of ``total`` (host memory, freed once the model moves to the device)."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.fetched_experts


@dataclass(frozen=True, slots=True)
class CommEstimate:
    """Bytes one GPU sends per optimizer step, by collective, split intra-/inter-node."""

    parts: dict[str, dict[str, int]]
    """name -> {"intra": bytes, "inter": bytes}; names: moe_all_to_all, moe_fetch_experts, tp, dp, pp
    (of the two MoE parts, the one of the dispatch mode not chosen is zero)."""
    moe_move_experts: dict[str, int]
    """moe.dispatch=experts' bytes (fetches and gradient returns) whatever the mode chosen."""
    stage: int
    """The pipeline stage these figures are for (the one that sends the most)."""
    all_to_all_calls: int = 0
    """All-to-all calls of one rank per step (the rows' exchanges and each layer's count exchange)."""
    fetch_calls: int = 0
    """moe.dispatch=experts: all-gather and reduce-scatter calls of one rank per step."""

    @property
    def total(self) -> int:
        return sum(p["intra"] + p["inter"] for p in self.parts.values())


@dataclass(frozen=True, slots=True)
class DispatchOption:
    """One way of dispatching, as the planner costed it for the busiest stage (per rank, per step)."""

    mode: str
    intra_bytes: int
    inter_bytes: int
    calls: int
    seconds: float
    """intra/intra_node_bw + inter/inter_node_bw (all-to-all bytes at all_to_all_efficiency) + latency x calls."""
    memory_bytes: int
    """Extra memory per GPU this mode needs (fetched weights and gradients; 0 for tokens)."""
    refused: str = ""
    """Why this mode cannot run this configuration ("" when it can)."""


@dataclass(frozen=True, slots=True)
class DispatchPlan:
    """moe.dispatch resolved: what was asked, what runs, why, and both options' costs."""

    requested: str
    chosen: str
    reason: str
    tokens: DispatchOption
    experts: DispatchOption


@dataclass(frozen=True, slots=True)
class TimeEstimate:
    assumed_mfu: float
    compute_seconds: float
    """Per step, at assumed_mfu, pipeline bubble included."""
    bubble_fraction: float
    comm_seconds: float
    """Per step, no overlap: intra bytes at intra_node_bw plus inter bytes at inter_node_bw, the
    all-to-all bytes at ``cluster.all_to_all_efficiency`` of those and ``cluster.collective_latency_us``
    per all-to-all call."""
    step_seconds: float
    """compute + comm (an upper bound: no overlap)."""
    tokens_per_step: int


@dataclass(frozen=True, slots=True)
class MemoryTierEstimate:
    """The fast tier (snapshots in host memory, replicated to peer nodes): ``plan/tiers.py``."""

    enabled: bool
    """checkpoint.memory_interval > 0; the figures are also given when off (what it would cost)."""
    replicas: int
    """Peer nodes holding a copy of each snapshot (checkpoint.memory_replicas, at most nodes - 1)."""
    snapshot_bytes_per_rank: int
    host_bytes_per_node: int
    """2 steps x ranks per node x snapshot per rank x (1 + replicas)."""
    host_memory_bytes: int
    """cluster.host_memory_gb."""
    snapshot_stall_seconds: float
    """Snapshot per rank / cluster.host_copy_bw_GBps: the training stall of one snapshot."""
    write_seconds: float
    """Snapshot per rank / cluster.host_write_GBps: writing it into node memory (in the background)."""
    replica_seconds: float
    """Snapshot per rank x replicas / inter_node_bw (in the background, after the write)."""
    interval_seconds: float
    """Recommended: max(Young/Daly on the stall, stall + write + replica transfer)."""
    interval_steps: int
    lost_work_seconds_with: float
    """Expected work lost per failure with the fast tier: half its interval (as set, else recommended) + stall."""
    lost_work_seconds_without: float
    """Storage alone: half the storage interval + its write time."""


@dataclass(frozen=True, slots=True)
class CheckpointEstimate:
    bytes: int
    """Weights (train dtype) plus optimizer state (fp32 master when bf16, Adam m and v)."""
    write_seconds: float
    job_mtbf_seconds: float
    interval_seconds: float
    """Young/Daly: sqrt(2 * write_seconds * job MTBF)."""
    interval_steps: int
    """interval_seconds / estimated step time, at least 1; the training loop's default save interval."""
    save_timeout_seconds: float = 60.0
    """Bound on each wait of the save protocol: checkpoint.save_timeout_s, or max(60 s, 10 x write_seconds)."""
    memory: MemoryTierEstimate | None = None
    """The fast tier's figures."""


@dataclass(frozen=True, slots=True)
class ParallelPlan:
    """Everything decided before any process starts. Produced by ``make_plan``; pure data."""

    world_size: int
    tp: int
    pp: int
    dp: int
    ep: int
    edp: int
    zero_stage: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    seq_len: int
    num_nodes: int
    gpus_per_node: int
    ranks: RankLayout
    pipeline: PipelinePlan
    experts: ExpertPlan | None
    moe_layers: tuple[int, ...]
    params: ParamCounts | None = None
    flops_per_token: int = 0
    memory: MemoryEstimate | None = None
    comm: CommEstimate | None = None
    time: TimeEstimate | None = None
    checkpoint: CheckpointEstimate | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)
    dispatch: DispatchPlan | None = None
    """moe.dispatch resolved (None for dense models)."""
