"""The configuration schema of hpframe: one dataclass per Hydra config group.

Every YAML file under ``hpframe/conf/`` and ``hpframe/recipes/`` is validated against these classes when Hydra
composes the configuration, so a misspelled key or a value of the wrong type fails at compose time.
Choices are ``str``-valued Enums (OmegaConf validates them by name, and they compare equal to
their string value). Counts start with ``num_``. ``-1`` means "derive it" wherever a field says so.

This module imports only the standard library and omegaconf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING


class Arch(str, Enum):
    """Model family."""

    gpt = "gpt"  # dense decoder, GELU or SwiGLU MLP, multi-head attention
    mixtral = "mixtral"  # GQA attention, SwiGLU MoE with a softmax router
    deepseek_v3 = "deepseek_v3"  # MLA attention, fine-grained + shared experts, sigmoid router
    qwen3_moe = "qwen3_moe"  # GQA attention with per-head q/k RMSNorm, softmax router, no shared experts


class Attention(str, Enum):
    gqa = "gqa"  # grouped-query attention (num_kv_heads <= num_heads); MHA when equal
    mla = "mla"  # multi-head latent attention (DeepSeek-V2/V3)


class RopeType(str, Enum):
    default = "default"  # plain rotary: inv_freq = theta^(-2i/d)
    yarn = "yarn"  # YaRN context extension (DeepSeek-V3): blended frequencies, attention-scale correction


class Activation(str, Enum):
    swiglu = "swiglu"
    gelu = "gelu"


class ScoreFunc(str, Enum):
    softmax = "softmax"
    sigmoid = "sigmoid"


class DropPolicy(str, Enum):
    probs = "probs"  # over capacity, keep the tokens with the highest router weight
    position = "position"  # over capacity, keep the earliest tokens in the batch


class Dispatch(str, Enum):
    tokens = "tokens"  # experts stay on their EP rank; tokens travel there and back (all-to-all)
    experts = "experts"  # tokens stay; each rank fetches the experts' weights and returns their gradients
    auto = "auto"  # the planner picks from its byte/time/memory model (see docs/planner.md)


class Recompute(str, Enum):
    none = "none"
    selective = "selective"  # recompute attention core and MoE expert activations only
    full = "full"  # recompute every transformer block in backward


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Device(str, Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class DataKind(str, Enum):
    synthetic = "synthetic"  # built-in deterministic corpus with learnable structure
    tokenized = "tokenized"  # memory-mapped token shards written by `python -m hpframe.data.prepare`


class WandbMode(str, Enum):
    online = "online"  # log to the Weights & Biases server (needs a login)
    offline = "offline"  # write under RUN_DIR/wandb only; upload later with `wandb sync`


class PlanFormat(str, Enum):
    table = "table"
    json = "json"


@dataclass
class ModelConfig:
    """Architecture of the transformer. Parameter shapes depend on these fields only."""

    name: str = MISSING
    """Free-form name shown in reports, e.g. 'mixtral_8x7b'."""
    from_hf: str = ""
    """A transformers checkpoint directory (what ``save_pretrained`` writes: config.json, safetensors files).
    Its config.json sets every field below that changes the computation (launch.py fills them in; an
    override that contradicts it is refused) and its weights are the initial weights. '' = off."""
    arch: Arch = Arch.mixtral
    """Model family: gpt (dense), mixtral, deepseek_v3, qwen3_moe. Every family is the one ``Transformer``, whose
    layers follow ``attention``, ``activation`` and the moe group; ``arch`` names the family's tensor
    layout in transformers' checkpoints (``hpframe.models.hf_adapter``: export and import; gpt has none)."""
    hidden_size: int = MISSING
    """Width of the residual stream."""
    num_layers: int = MISSING
    """Number of transformer blocks."""
    num_heads: int = MISSING
    """Attention (query) heads."""
    num_kv_heads: int = -1
    """Key/value heads for GQA; -1 means num_heads (plain multi-head attention). Ignored by MLA."""
    head_dim: int = -1
    """Per-head dimension for GQA; -1 means hidden_size // num_heads."""
    qk_norm: bool = False
    """GQA: an RMSNorm over head_dim (one weight of head_dim shared by the heads, eps norm_eps) on every
    query and key head before rotary, as Qwen3 does."""
    ffn_hidden_size: int = MISSING
    """Inner size of the dense MLP (dense layers and the dense family)."""
    vocab_size: int = MISSING
    """Vocabulary size of the tokenizer (what targets and token ids range over)."""
    vocab_pad_multiple: int = 1
    """Embedding and head rows are vocab_size rounded up to a multiple of this; the padded rows get logit
    -inf (never any probability) and are dropped on export. 1 = no padding; 0 = parallel.tp (set at plan
    time, so a vocabulary that tp does not divide can be split)."""
    max_seq_len: int = 4096
    """Longest sequence the rotary tables are built for."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head."""
    attention: Attention = Attention.gqa
    """gqa or mla."""
    activation: Activation = Activation.swiglu
    """MLP activation of dense layers and experts."""
    first_k_dense: int = 0
    """With MoE on, the first k blocks use a dense MLP (DeepSeek-V3 uses 3)."""
    q_lora_rank: int = 0
    """MLA: rank of the query down-projection; 0 means a full-rank query projection."""
    kv_lora_rank: int = 512
    """MLA: rank of the joint key/value latent."""
    qk_nope_head_dim: int = 128
    """MLA: per-head query/key dims without rotary."""
    qk_rope_head_dim: int = 64
    """MLA: per-head decoupled rotary dims (shared key across heads)."""
    v_head_dim: int = 128
    """MLA: per-head value dim."""
    rope_theta: float = 10000.0
    """Rotary base."""
    rope_type: RopeType = RopeType.default
    """Rotary frequencies: default, or yarn (the five rope_* fields below)."""
    rope_factor: float = 1.0
    """YaRN: context extension factor (interpolated frequencies are divided by it)."""
    rope_original_max_len: int = 4096
    """YaRN: context length of pre-training (original_max_position_embeddings)."""
    rope_beta_fast: float = 32.0
    """YaRN: rotations per original context above which a frequency is kept (extrapolated)."""
    rope_beta_slow: float = 1.0
    """YaRN: rotations per original context below which a frequency is interpolated."""
    rope_mscale: float = 0.0
    """YaRN: cos/sin are scaled by m(factor, rope_mscale) / m(factor, rope_mscale_all_dim) with
    m(s, a) = 0.1 a ln s + 1; 0 (both 0) = scale by m(factor, 1)."""
    rope_mscale_all_dim: float = 0.0
    """YaRN: MLA's softmax scale is multiplied by m(factor, rope_mscale_all_dim)^2 when nonzero."""
    rope_truncate: bool = True
    """YaRN: round the correction range to whole dims (transformers' ``truncate``)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init."""


@dataclass
class MoEConfig:
    """Mixture-of-Experts settings. num_experts=0 makes every block dense."""

    num_experts: int = 0
    """Routed experts per MoE layer; 0 = dense model."""
    num_shared_experts: int = 0
    """Experts applied to every token (DeepSeek); their outputs add to the routed output."""
    expert_ffn_hidden_size: int = -1
    """Inner size of one expert (routed and shared); -1 means model.ffn_hidden_size."""
    top_k: int = 2
    """Experts per token."""
    score_func: ScoreFunc = ScoreFunc.softmax
    """Router score: softmax over experts, or per-expert sigmoid."""
    norm_topk_prob: bool = True
    """Renormalize the k selected weights to sum to 1."""
    route_scale: float = 1.0
    """Multiplier on the combine weights (DeepSeek-V3 uses 2.5)."""
    noisy_gate_std: float = 0.0
    """Std of Gaussian noise added to router logits in training only (noisy top-k gating); 0 = off."""
    jitter_eps: float = 0.0
    """Multiplicative input jitter U(1-eps, 1+eps) on router inputs in training only; 0 = off."""
    capacity_factor: float = 1.25
    """Training capacity factor: capacity = max(ceil(tokens/experts * top_k * factor), min_capacity)."""
    eval_capacity_factor: float = 2.0
    """Capacity factor outside training."""
    min_capacity: int = 4
    """Lower bound of an expert's capacity in tokens."""
    dropless: bool = True
    """No capacity: every routed token is computed. When false, tokens over capacity are dropped."""
    drop_policy: DropPolicy = DropPolicy.probs
    """Which tokens an over-full expert keeps: highest router weight (probs) or earliest (position)."""
    aux_loss_coef: float = 0.01
    """Switch/GShard load-balancing loss coefficient; 0 = off."""
    importance_loss_coef: float = 0.0
    """Importance loss (coef * CV^2 of per-expert importance, Shazeer et al. 2017); 0 = off."""
    seq_aux_loss_coef: float = 0.0
    """DeepSeek-V3 sequence-level balance loss coefficient; 0 = off."""
    z_loss_coef: float = 0.0
    """Router z-loss coefficient (ST-MoE); 0 = off."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing: per-expert selection bias moved by +-rate after each step; 0 = off."""
    num_expert_groups: int = 1
    """Groups for group-limited routing on one device; the runtime uses the nodes the EP group spans."""
    max_nodes_per_token: int = 0
    """Node-limited routing: a token reaches experts in at most this many groups/nodes; 0 = off."""
    moe_layer_freq: int = 1
    """Every n-th block after first_k_dense is MoE (1 = all)."""
    dense_layers: list[int] = field(default_factory=list)
    """Blocks that keep a dense MLP although the two rules above make them MoE (Qwen3-MoE's
    mlp_only_layers); empty = none."""
    dispatch: Dispatch = Dispatch.tokens
    """With parallel.ep > 1: move tokens to the experts (all-to-all), move the experts' weights to the
    tokens (fetched per node, gradients returned to their owners), or let the planner choose (auto)."""


@dataclass
class ParallelConfig:
    """Parallel degrees and batch shape. tp*pp*dp must equal the world size; ep borrows ranks from dp."""

    tp: int = 1
    """Tensor-parallel degree (innermost axis by default: stays inside a node)."""
    pp: int = 1
    """Pipeline-parallel stages."""
    dp: int = -1
    """Data-parallel degree; -1 = world_size // (tp * pp)."""
    ep: int = 1
    """Expert-parallel degree; must divide dp. Expert-data-parallel degree = dp // ep."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence across the TP group."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = -1
    """Sequences per optimizer step over all ranks; -1 = micro_batch_size * dp * grad_accum."""
    grad_accum: int = -1
    """Micro-batches per step per rank (also the pipeline's micro-batch count); -1 = derived."""
    recompute: Recompute = Recompute.none
    """Activation recomputation policy."""
    ep_overlap: bool = True
    """With ep > 1 and shared experts: compute the shared experts while the dispatch all-to-all is in flight."""
    axis_order: str = "pp-dp-tp"
    """Rank layout, outermost axis first. EP is always the inner part of dp (dp = edp x ep)."""
    pipeline_layout: list[int] = field(default_factory=list)
    """Manual pipeline partition: number of transformer blocks per stage; empty = balanced by cost."""


@dataclass
class TrainConfig:
    """Optimization and loop schedule."""

    steps: int = 100
    """Optimizer steps."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of cosine decay."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 = off."""
    seed: int = 1234
    dtype: DType = DType.fp32
    """Parameter/compute dtype (bf16 on GPUs, fp32 on CPUs)."""
    master_dtype: DType = DType.fp32
    """With dtype=bf16: dtype of the optimizer's master weights, gradient accumulation and Adam moments.
    fp32 (default) keeps fp32 copies (DeepSpeed's BF16_Optimizer under ZeRO-1); bf16 updates the bf16
    weights directly with bf16 moments (ZeRO 1/2 only): 8 bytes less per parameter and no copies, but
    updates smaller than a bf16 step of a weight are lost."""
    device: Device = Device.auto
    """auto (cuda when the machine has a GPU), cpu or cuda. A plan for a GPU cluster (cluster.device=cuda)
    is refused on a machine without GPUs unless train.device=cpu asks for the CPU explicitly."""
    num_threads: int = 0
    """torch intra-op threads per process; 0 = OMP_NUM_THREADS when set, else the cores left free by the
    load and the other local processes, 1 when fewer than two are free."""
    log_interval: int = 1
    """Steps between log lines."""
    eval_interval: int = 0
    """Steps between evaluations; 0 = only at the end."""
    eval_steps: int = 2
    """Micro-batches per evaluation."""
    max_nonfinite_steps: int = 3
    """Consecutive NaN/Inf steps tolerated (each skipped) before the run stops."""
    progress: bool = True
    """Rich progress bar on rank 0."""
    tensorboard: bool = True
    """Write TensorBoard event files in the run directory."""
    wandb: bool = False
    """Also log the step figures to Weights & Biases (needs ``pip install wandb``; rank 0 only)."""
    wandb_project: str = "hpframe"
    """Weights & Biases project of the run."""
    wandb_mode: WandbMode = WandbMode.online
    """online, or offline: written under RUN_DIR/wandb without a network (upload later with ``wandb sync``)."""
    compile: bool = False
    """torch.compile the transformer blocks."""
    overlap_optimizer: bool = False
    """On CUDA with the plain update (parallel.zero_stage=0, parallel.pp=1): run each step's AdamW update
    on a side stream, block by block, so that the next step's forward starts once the embedding and
    the first block are updated and the rest of the update runs beside it (same results bit for bit)."""
    gc_interval: int = 0
    """Python garbage collection: 0 = automatic (Python's own thresholds; a collection can pause the host
    at any point of a step); N > 0 = automatic collection off during training and one full collection
    every N steps, between steps."""
    profile_from_step: int = 0
    """Trace ``profile_num_steps`` steps from this one with torch.profiler, into RUN_DIR/profile/; 0 = off."""
    profile_num_steps: int = 3
    """Steps traced when ``profile_from_step`` > 0."""
    profile_with_stack: bool = False
    """Record the Python call stack of every operator (finds which code issues a kernel; slower)."""
    collective_timeout_s: float = 0.0
    """Seconds a collective may wait for the other ranks before the run fails (a stalled or stopped rank);
    0 = derived from the plan: max(600, 20 x the estimated step time, 4 x the estimated checkpoint write time)."""
    fail_at_step: int = 0
    """Testing aid for restart tests: rank 1 (rank 0 alone) SIGKILLs itself after this step, in the first
    attempt of a torchrun job only (TORCHELASTIC_RESTART_COUNT=0); 0 = off. Never set it in real runs."""


@dataclass
class DataConfig:
    """Training data."""

    kind: DataKind = DataKind.synthetic
    """synthetic (built-in corpus) or tokenized (shards written by `python -m hpframe.data.prepare`)."""
    path: str = ""
    """Directory of a tokenized dataset (kind=tokenized)."""
    eval_path: str = ""
    """Directory of a separate tokenized evaluation set; empty = hold out the last ``eval_fraction`` of
    ``path`` (with it, all of ``path`` trains)."""
    seq_len: int = 128
    """Tokens per training sequence."""
    num_synthetic_tokens: int = 1_000_000
    """Size of the synthetic corpus."""
    eval_fraction: float = 0.01
    """Held-out fraction for evaluation (unused with ``eval_path``)."""
    inputs: list[str] = field(default_factory=list)
    """Text, JSON Lines or Parquet files, directories or glob patterns that rank 0 prepares into
    ``path`` before training when ``path`` holds no dataset yet (``python -m hpframe.data.prepare``);
    empty = ``path`` must already hold one."""
    tokenizer: str = ""
    """For ``inputs``: a model directory or tokenizer.json; empty = ``model.from_hf``'s tokenizer when set,
    else a byte-level BPE of ``model.vocab_size`` entries trained on the inputs."""
    text_field: str = "text"
    """For ``inputs``: the JSON Lines field / Parquet column holding the text."""
    document_mask: bool = False
    """Packed documents do not see each other: attention is block-diagonal causal and rotary positions
    restart at each document (a document ends with the dataset's EOS id; token 0 for the synthetic
    corpus). False = plain causal attention across the packed sequence."""
    seed: int = 1234
    """Seed of the sampling order (and of the synthetic corpus)."""


@dataclass
class CheckpointConfig:
    enabled: bool = True
    """Write checkpoints (and resume from them, see resume)."""
    dir: str = "checkpoints"
    """Directory of checkpoints, relative to the run directory unless absolute."""
    interval: int = 0
    """Steps between saves; 0 = the planner's recommended interval (Young/Daly), at least once at the end."""
    keep_last: int = 3
    """Keep this many newest checkpoints of the run's line (0 = all); older ones of that line are pruned
    after a save completes; what ``latest`` names and other lines' checkpoints never are."""
    resume: str = "auto"
    """'auto' (what ``latest`` in dir names, else the newest verified checkpoint of its lineage; exit 2 when
    checkpoints exist but none verifies), 'none' (start over), or a checkpoint path."""
    async_save: bool = False
    """Snapshot to host memory and persist in a background thread."""
    memory_interval: int = 0
    """Steps between snapshots to host memory (the fast tier, hpframe/checkpoint/memory.py); 0 = off.
    Storage saves (``interval``) then write the snapshot of their step instead of taking another."""
    memory_replicas: int = 1
    """Other nodes that keep a copy of each rank's snapshot (ring order); losing this many nodes loses none."""
    memory_dir: str = "/dev/shm"
    """Host memory that outlives the workers: a shared-memory file system on every node."""
    preempt_grace_s: float = 25.0
    """On SIGTERM or SIGINT (preemption, Ctrl-C), seconds allowed to finish the current step and write a final
    checkpoint before the process exits anyway (below SLURM's default KillWait and Kubernetes' default
    terminationGracePeriodSeconds of 30 s). Exit code 4: stopped with a final checkpoint; 5: without one."""
    save_timeout_s: float = 0.0
    """Bound on every wait of the save protocol (a rank waiting for the others at a barrier, rank 0 for
    every rank's part, the previous background write); past it the save fails naming the missing ranks.
    0 = derived from the plan: max(60 s, 10 x the planned write time of one checkpoint)."""


@dataclass
class ClusterConfig:
    """The machines a plan targets. world_size = nodes * gpus_per_node."""

    name: str = MISSING
    nodes: int = 1
    """Machines in the job."""
    gpus_per_node: int = MISSING
    """Devices (GPUs, or CPU processes) per node; -1 = as many as the parallel degrees need (local runs)."""
    device: Device = Device.cuda
    """Device type of the cluster."""
    gpu_memory_gb: float = 80.0
    """Memory per device in GiB."""
    intra_node_bw_GBps: float = 450.0
    """Per-GPU bandwidth inside a node (NVLink), GB/s one direction."""
    inter_node_bw_GBps: float = 50.0
    """Per-GPU bandwidth across nodes (network), GB/s one direction."""
    all_to_all_efficiency: float = 1.0
    """Fraction of the link bandwidth (intra_node_bw_GBps / inter_node_bw_GBps) that an all-to-all's
    bytes move at; with ``collective_latency_us`` it gives the planner's all-to-all time."""
    collective_latency_us: float = 0.0
    """Fixed time per all-to-all call, microseconds (start-up, synchronization of the ranks)."""
    peak_tflops: float = 989.0
    """Dense bf16 peak per device in TFLOP/s (used for MFU and time estimates)."""
    host_memory_gb: float = 1024.0
    """Host (CPU) memory per node in GiB; the fast tier's snapshots (checkpoint.memory_interval) must fit."""
    host_copy_bw_GBps: float = 25.0
    """Device-to-host copy bandwidth per device, GB/s (the fast tier's snapshot stall)."""
    host_write_GBps: float = 2.0
    """Rate at which one rank's background thread writes its snapshot into node shared memory, GB/s
    (the fast tier's shortest interval; ~2.1-2.5 measured on an H100 host, 1.2 on a 2-core CPU machine:
    bench/results/2026-12-06_h100_snapshot_stall_after_write_fix, 2026-12-06_cpu_part_write)."""
    storage_bw_GBps: float = 10.0
    """Aggregate checkpoint write bandwidth of the job, GB/s."""
    gpu_mtbf_hours: float = 50_000.0
    """Mean time between failures of one device (job MTBF = this / world_size)."""


@dataclass
class PlanConfig:
    dry_run: bool = False
    """Print the plan and exit; starts no process and needs no GPU."""
    format: PlanFormat = PlanFormat.table
    """table (readable) or json (one document)."""
    memory_check: bool = True
    """Refuse plans whose estimated memory exceeds the device memory (warning only when false)."""
    assumed_mfu: float = 0.4
    """Model FLOPs utilisation assumed for the compute-time estimate (fraction of cluster.peak_tflops)."""
    suggest: bool = False
    """With dry_run: also list tp/pp/ep/dp layouts that fit memory, fastest estimated step first."""


@dataclass
class RunConfig:
    """The whole run. Hydra composes it from hpframe/conf/config.yaml, a recipe and command-line overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    recipe: str = ""
    """Name of the recipe the run was composed from."""
    output_dir: str = "."
    """Run directory (Hydra sets it to outputs/DATE/TIME)."""
