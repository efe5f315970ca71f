"""Dense building blocks: RMSNorm, rotary embedding, grouped-query attention, SwiGLU/GELU MLP.

Single-device code: no torch.distributed and no parallel sizes; shapes depend on the config only.
Shape legend: B batch, S sequence, H hidden, nh query heads, nkv key/value heads, hd head dim, F MLP inner.
No biases anywhere. Weights are created uninitialized (``torch.empty``) so a model can be built on the
meta device; ``Transformer.init_weights`` fills them, and fills the rotary tables through
``RotaryEmbedding.reset_tables``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hpframe.config.schema import Activation, ModelConfig, RopeType


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (computed in fp32, as transformers does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction m(s, a) = 0.1 a ln s + 1 (1 for s <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq[dim/2] fp32, factor on cos/sin) for rotary over ``dim`` dims, as transformers computes them.

    default: theta^(-2i/dim), factor 1. yarn (``model.rope_*``): frequencies of more than beta_fast
    rotations over the original context are kept, those of fewer than beta_slow divided by
    rope_factor, a linear ramp in between; cos/sin scaled by m(f, mscale) / m(f, mscale_all_dim)
    (or m(f, 1) when either is 0).
    """
    base = cfg.rope_theta
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if RopeType(cfg.rope_type) == RopeType.default:
        return 1.0 / pos, 1.0
    f = cfg.rope_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        attn_factor = yarn_mscale(f, cfg.rope_mscale) / yarn_mscale(f, cfg.rope_mscale_all_dim)
    else:
        attn_factor = yarn_mscale(f)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate (divided by the factor)
    return (1.0 / (f * pos)) * (1 - keep) + (1.0 / pos) * keep, attn_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_seq_len, dim/2] of rotary position embedding (non-persistent buffers).

    The tables are plain functions of (dim, max_seq_len, the rope fields of the config); they are
    recomputed by ``reset_tables`` after a meta-device build (``init_weights`` calls it).
    """

    def __init__(self, dim: int, cfg: ModelConfig) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dim must be even, got {dim}")
        self.dim, self.max_seq_len, self.cfg = dim, cfg.max_seq_len, cfg
        self.register_buffer("cos", torch.empty(self.max_seq_len, dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(self.max_seq_len, dim // 2), persistent=False)

    @torch.no_grad()
    def reset_tables(self) -> None:
        """(Re)compute the tables in fp32 on CPU (same values on every device), then copy them in."""
        inv_freq, factor = rope_frequencies(self.cfg, self.dim)
        angles = torch.arange(self.max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
        # through torch.polar (the C library's cos/sin, element by element), not Tensor.cos/sin: on a
        # CPU with MKL those run through MKL's vector math, whose accuracy mode is per thread, and the
        # first multi-threaded call of a process computed half the table ~1e-4 off (seen with 2 threads)
        rot = torch.polar(torch.ones_like(angles), angles)
        self.cos.copy_(rot.real * factor)
        self.sin.copy_(rot.imag * factor)

    def forward(self, seq_len: int, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions 0..seq_len-1, each [S, dim/2]; or at ``positions`` [B,S], each [B,S,dim/2]."""
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len={self.max_seq_len}")
        if positions is not None:
            return self.cos[positions], self.sin[positions]
        return self.cos[:seq_len], self.sin[:seq_len]


def _per_token(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A rotary table [S,d] or [B,S,d] shaped to broadcast over x[B,S,heads,d]."""
    return (t[None, :, None, :] if t.dim() == 2 else t[:, :, None, :]).to(like.dtype)


def document_attention_mask(positions: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask bool[B,1,S,S] of packed documents (``data.document_mask``).

    ``positions`` [B,S] restart at 0 where a document starts; query i sees key j iff j <= i and no
    document starts in (j, i]. True means "attend" (scaled_dot_product_attention's convention).
    """
    doc = torch.cumsum(positions == 0, dim=1)  # [B,S] document index of each token
    s = positions.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=positions.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def apply_rotary_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on x[B,S,heads,d] pairing dim i with i+d/2 (the Llama/Mixtral "rotate_half" layout)."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2], x[..., d2:]
    c, s = _per_token(cos, x), _per_token(sin, x)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on x[B,S,heads,d] pairing dims (2i, 2i+1) (the DeepSeek layout).

    The output lists the rotated even dims, then the odd dims. Queries and keys go through the same
    map, so the order of the output dims does not change q.k; it matches transformers' DeepSeek-V3.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = _per_token(cos, x), _per_token(sin, x)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


class Attention(nn.Module):
    """Causal grouped-query attention with rotary on q and k (MHA when nkv == nh), optionally
    with a per-head RMSNorm on q and k before rotary (``model.qk_norm``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads if cfg.num_kv_heads > 0 else cfg.num_heads
        self.head_dim = cfg.head_dim if cfg.head_dim > 0 else cfg.hidden_size // cfg.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.num_kv_heads}"
            )
        h, nh, nkv, hd = cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.wq = nn.Linear(h, nh * hd, bias=False)
        self.wk = nn.Linear(h, nkv * hd, bias=False)
        self.wv = nn.Linear(h, nkv * hd, bias=False)
        self.wo = nn.Linear(nh * hd, h, bias=False)
        # Qwen3: one RMSNorm over head_dim for all query heads, one for all key heads
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(hd, cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x[B,S,H] -> [B,S,H]; ``positions`` [B,S] (packed documents): rotary at those positions and
        attention only inside each document (``document_attention_mask``)."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.num_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary(s, positions)
        q, k = apply_rotary_half(q, cos, sin), apply_rotary_half(k, cos, sin)
        mask = document_attention_mask(positions) if positions is not None else None
        # sdpa wants [B, heads, S, hd]; enable_gqa repeats each kv head nh/nkv times.
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self.wo(o.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """Position-wise MLP. swiglu: w2(silu(w1 x) * w3 x); gelu: w2(gelu(w1 x)) (tanh-free exact GELU)."""

    def __init__(self, hidden: int, inner: int, activation: Activation) -> None:
        super().__init__()
        self.activation = Activation(activation)
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False) if self.activation == Activation.swiglu else None
        self.w2 = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))
