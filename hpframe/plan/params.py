"""Exact parameter counts of hpframe models, per component, and training FLOPs per token.

The layout mirrors hpframe/models exactly (no biases anywhere):
embedding V*H; final norm H; head V*H unless tied; per block two RMSNorm weights (H each);
GQA wq H*(nh*hd), wk and wv H*(nkv*hd), wo (nh*hd)*H; MLA as in DeepSeek-V2/V3 (see
``attention_params``); dense MLP 3*H*F (SwiGLU) or 2*H*F (GELU); an MoE block has a router gate
H*E (the aux-loss-free bias is a buffer), E routed experts and S shared experts of (3 or 2)*H*Fe.
Block i is MoE when E > 0, i >= first_k_dense, (i - first_k_dense) % moe_layer_freq == 0 and i is not
in moe.dense_layers. With model.qk_norm a GQA block has two more norm weights of head_dim (q and k).
Embedding and head rows are the padded vocabulary (``padded_vocab``).
"""

from __future__ import annotations

from dataclasses import dataclass

from hpframe.config.schema import Activation, Attention, ModelConfig, MoEConfig

COMPONENTS = ("embedding", "attention", "mlp", "router", "experts", "shared_experts", "norms", "head")


def head_dim(m: ModelConfig) -> int:
    return m.head_dim if m.head_dim > 0 else m.hidden_size // m.num_heads


def num_kv_heads(m: ModelConfig) -> int:
    return m.num_kv_heads if m.num_kv_heads > 0 else m.num_heads


def expert_ffn(m: ModelConfig, moe: MoEConfig) -> int:
    return moe.expert_ffn_hidden_size if moe.expert_ffn_hidden_size > 0 else m.ffn_hidden_size


def mlp_mats(m: ModelConfig) -> int:
    """Weight matrices of one MLP/expert: 3 for SwiGLU (w1, w2, w3), 2 for GELU."""
    return 3 if m.activation == Activation.swiglu else 2


def is_moe_block(m: ModelConfig, moe: MoEConfig, i: int) -> bool:
    return (moe.num_experts > 0 and i >= m.first_k_dense and (i - m.first_k_dense) % max(moe.moe_layer_freq, 1) == 0
            and i not in moe.dense_layers)


def padded_vocab(m: ModelConfig, tp: int = 1) -> int:
    """Rows of the embedding and head: vocab_size rounded up to a multiple of model.vocab_pad_multiple
    (0: of ``tp``, the run's parallel.tp)."""
    k = m.vocab_pad_multiple if m.vocab_pad_multiple > 0 else tp
    return -(-m.vocab_size // k) * k


def moe_layers(m: ModelConfig, moe: MoEConfig) -> tuple[int, ...]:
    """Block indices with an MoE MLP."""
    return tuple(i for i in range(m.num_layers) if is_moe_block(m, moe, i))


def attention_params(m: ModelConfig) -> int:
    """Weights of one attention module (matmuls plus the MLA latent norms)."""
    h, nh = m.hidden_size, m.num_heads
    if m.attention == Attention.mla:
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank > 0:
            q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * nh * qk
        else:
            q = h * nh * qk
        kv = h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank + m.kv_lora_rank * nh * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + nh * m.v_head_dim * h
    hd, nkv = head_dim(m), num_kv_heads(m)
    return h * nh * hd + 2 * h * nkv * hd + nh * hd * h + (2 * hd if m.qk_norm else 0)


def attention_replicated_params(m: ModelConfig) -> int:
    """The part of ``attention_params`` that tensor parallelism replicates: MLA's down-projections
    (wq_a, wkv_a) and latent norms; GQA attention is split by heads, except its q/k norms."""
    if m.attention != Attention.mla:
        return 2 * head_dim(m) if m.qk_norm else 0  # the q/k norms
    h = m.hidden_size
    q = h * m.q_lora_rank + m.q_lora_rank if m.q_lora_rank > 0 else 0
    return q + h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank


def moe_fwd_flops(m: ModelConfig, moe: MoEConfig) -> int:
    """Forward FLOPs per token of all MoE MLPs (router, shared and top_k routed experts)."""
    total = 0
    for i in moe_layers(m, moe):
        b = block_params(m, moe, i)
        total += 2 * (b.router + b.shared_experts + min(moe.top_k, moe.num_experts) * b.one_expert)
    return total


def attention_norm_params(m: ModelConfig) -> int:
    """The part of ``attention_params`` that is norm weights (no matmul FLOPs)."""
    if m.attention != Attention.mla:
        return 2 * head_dim(m) if m.qk_norm else 0
    return m.kv_lora_rank + (m.q_lora_rank if m.q_lora_rank > 0 else 0)


@dataclass(frozen=True, slots=True)
class BlockParams:
    """Parameters of one transformer block, by component."""

    attention: int
    norms: int
    mlp: int  # dense MLP (0 in an MoE block)
    router: int
    experts: int  # all routed experts
    shared_experts: int
    one_expert: int  # one routed expert
    is_moe: bool

    @property
    def total(self) -> int:
        return self.attention + self.norms + self.mlp + self.router + self.experts + self.shared_experts


def block_params(m: ModelConfig, moe: MoEConfig, i: int) -> BlockParams:
    """Parameters of block ``i``."""
    h = m.hidden_size
    attn, norms = attention_params(m), 2 * h
    if is_moe_block(m, moe, i):
        one = mlp_mats(m) * h * expert_ffn(m, moe)
        return BlockParams(attn, norms, 0, h * moe.num_experts, moe.num_experts * one, moe.num_shared_experts * one, one, True)
    return BlockParams(attn, norms, mlp_mats(m) * h * m.ffn_hidden_size, 0, 0, 0, 0, False)


@dataclass(frozen=True, slots=True)
class ParamCounts:
    """Whole-model parameter counts; ``by_component`` keys are COMPONENTS."""

    total: int
    active: int
    by_component: dict[str, int]
    active_by_component: dict[str, int]


def count_params(m: ModelConfig, moe: MoEConfig, tp: int = 1) -> ParamCounts:
    """Exact totals and active-per-token counts (active = total - (E - top_k) experts per MoE block)."""
    h, v = m.hidden_size, padded_vocab(m, tp)
    comp = dict.fromkeys(COMPONENTS, 0)
    comp["embedding"] = v * h
    comp["head"] = 0 if m.tie_embeddings else v * h
    comp["norms"] = h
    inactive = 0
    for i in range(m.num_layers):
        b = block_params(m, moe, i)
        comp["attention"] += b.attention
        comp["norms"] += b.norms
        comp["mlp"] += b.mlp
        comp["router"] += b.router
        comp["experts"] += b.experts
        comp["shared_experts"] += b.shared_experts
        if b.is_moe:
            inactive += (moe.num_experts - min(moe.top_k, moe.num_experts)) * b.one_expert
    active = dict(comp)
    active["experts"] = comp["experts"] - inactive
    total = sum(comp.values())
    return ParamCounts(total=total, active=total - inactive, by_component=comp, active_by_component=active)


def attention_score_flops_fwd(m: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one layer's QK^T and AV products (full sequence, no causal discount)."""
    if m.attention == Attention.mla:
        qk, vd = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    else:
        qk = vd = head_dim(m)
    return 2 * m.num_heads * (qk + vd) * seq_len


def block_matmul_active(m: ModelConfig, moe: MoEConfig, i: int) -> int:
    """Matmul weights one token meets in block ``i`` (norm weights excluded)."""
    b = block_params(m, moe, i)
    routed = min(moe.top_k, moe.num_experts) * b.one_expert if b.is_moe else 0
    return b.attention - attention_norm_params(m) + b.mlp + b.router + b.shared_experts + routed


def block_fwd_flops(m: ModelConfig, moe: MoEConfig, i: int, seq_len: int) -> int:
    """Forward FLOPs per token of block ``i``: 2 x active matmul weights + attention scores/values."""
    return 2 * block_matmul_active(m, moe, i) + attention_score_flops_fwd(m, seq_len)


def head_fwd_flops(m: ModelConfig) -> int:
    """Forward FLOPs per token of the LM head (tied or not, the matmul happens)."""
    return 2 * m.vocab_size * m.hidden_size


def flops_per_token(m: ModelConfig, moe: MoEConfig, seq_len: int) -> int:
    """Training FLOPs per token = 3 x forward = 6 x active matmul weights (head included, embedding
    lookup excluded) + 3 x (QK^T and AV: 2 * num_heads * (qk_dim + v_dim) * seq_len per layer)."""
    fwd = sum(block_fwd_flops(m, moe, i, seq_len) for i in range(m.num_layers)) + head_fwd_flops(m)
    return 3 * fwd
