"""Multi-head latent attention (DeepSeek-V2/V3), single device.

Shape legend: B batch, S sequence, H hidden, nh heads, dn qk_nope_head_dim, dr qk_rope_head_dim,
dv v_head_dim, rq q_lora_rank, rkv kv_lora_rank.
Queries: H -> rq (wq_a) -> RMSNorm -> nh*(dn+dr) (wq_b), or H -> nh*(dn+dr) (wq) when rq == 0.
Keys/values: H -> rkv + dr (wkv_a); the rkv latent is normalized and expanded to nh*(dn+dv) (wkv_b);
the dr part is ONE rotary key shared by all heads (decoupled rotary). Rotary pairs dims (2i, 2i+1)
as DeepSeek does, so weights load from DeepSeek checkpoints without permutation.
Softmax scale 1/sqrt(dn+dr), times m(rope_factor, rope_mscale_all_dim)^2 under YaRN with a nonzero
rope_mscale_all_dim, as transformers' DeepSeek-V3 does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpframe.config.schema import ModelConfig, RopeType
from hpframe.models.layers import RMSNorm, RotaryEmbedding, apply_rotary_interleaved, document_attention_mask, yarn_mscale

# DeepSeek's reference code (and transformers) build the two latent norms with their default eps,
# not with the model's norm_eps.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """Causal multi-head latent attention."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, nh = cfg.hidden_size, cfg.num_heads
        self.num_heads = nh
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk = self.dn + self.dr
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, nh * qk, bias=False)
            self.wq = None
        else:
            self.wq_a = self.q_norm = self.wq_b = None
            self.wq = nn.Linear(h, nh * qk, bias=False)
        self.wkv_a = nn.Linear(h, cfg.kv_lora_rank + self.dr, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, nh * (self.dn + self.dv), bias=False)
        self.wo = nn.Linear(nh * self.dv, h, bias=False)
        self.rotary = RotaryEmbedding(self.dr, cfg)
        self.scale = qk**-0.5
        if RopeType(cfg.rope_type) == RopeType.yarn and cfg.rope_mscale_all_dim:
            self.scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x[B,S,H] -> [B,S,H]; ``positions`` [B,S]: packed documents, as in ``layers.Attention``."""
        b, s, _ = x.shape
        nh = self.num_heads
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(b, s, nh, self.dn + self.dr)
        q_nope, q_rope = q.split([self.dn, self.dr], dim=-1)
        kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.dr], dim=-1)
        kv = self.wkv_b(self.kv_norm(kv)).view(b, s, nh, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        cos, sin = self.rotary(s, positions)
        q_rope = apply_rotary_interleaved(q_rope, cos, sin)
        k_rope = apply_rotary_interleaved(k_rope.view(b, s, 1, self.dr), cos, sin)  # one key for all heads
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(b, s, nh, self.dr)], dim=-1)
        # [B, nh, S, d]; sdpa allows a value dim (dv) different from the query/key dim (dn+dr).
        mask = document_attention_mask(positions) if positions is not None else None
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=mask is None,
            scale=self.scale,
        )
        return self.wo(o.transpose(1, 2).reshape(b, s, nh * self.dv))
