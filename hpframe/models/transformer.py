"""Decoder-only transformer: embedding -> blocks (dense or MoE MLP by layer index) -> norm -> head.

Single-device code (no torch.distributed, no parallel sizes). ``layers`` is a flat ModuleList whose
index is the block index the planner uses. Build on the meta device, then ``to_empty`` +
``init_weights(seed)``: every tensor is drawn on the CPU from a generator seeded by (seed, its
name), so the weights do not depend on the device, on the order modules are materialized, or on
which blocks a pipeline stage keeps.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from hpframe.config.schema import Attention as AttentionKind
from hpframe.config.schema import ModelConfig, MoEConfig
from hpframe.models.layers import MLP, Attention, RMSNorm, RotaryEmbedding
from hpframe.models.mla import MLAttention
from hpframe.models.moe import MoE, GroupedExperts, Router
from hpframe.plan.validate import validate_model_build


def is_moe_layer(index: int, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> bool:
    """Block ``index`` has an MoE MLP iff E>0, index >= first_k_dense, (index-first_k_dense) % freq == 0
    and index is not in moe.dense_layers."""
    return (
        moe_cfg.num_experts > 0
        and index >= model_cfg.first_k_dense
        and (index - model_cfg.first_k_dense) % moe_cfg.moe_layer_freq == 0
        and index not in moe_cfg.dense_layers
    )


class Block(nn.Module):
    """Pre-norm block: x + attn(attn_norm(x)), then x + mlp(mlp_norm(x))."""

    def __init__(self, index: int, model_cfg: ModelConfig, moe_cfg: MoEConfig, routing_groups: int) -> None:
        super().__init__()
        h = model_cfg.hidden_size
        self.index = index
        self.attn_norm = RMSNorm(h, model_cfg.norm_eps)
        if AttentionKind(model_cfg.attention) == AttentionKind.mla:
            self.attn: nn.Module = MLAttention(model_cfg)
        else:
            self.attn = Attention(model_cfg)
        self.mlp_norm = RMSNorm(h, model_cfg.norm_eps)
        if is_moe_layer(index, model_cfg, moe_cfg):
            self.mlp: nn.Module = MoE(h, model_cfg.activation, moe_cfg, routing_groups, model_cfg.ffn_hidden_size)
        else:
            self.mlp = MLP(h, model_cfg.ffn_hidden_size, model_cfg.activation)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        h, normed = self.attention_half(x, positions)
        return h + self.mlp(normed)

    def attention_half(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """h = x + attn(attn_norm(x)) and mlp_norm(h): the part of the block whose shapes never change.

        ``train.compile`` compiles this whole function (``parallel.compile.apply_compile``), so the
        residual add and both norms fuse with their neighbours forward and backward.
        """
        # positions travel positionally: the TP hooks pass every argument after x through unchanged
        h = x + (self.attn(self.attn_norm(x)) if positions is None else self.attn(self.attn_norm(x), positions))
        return h, self.mlp_norm(h)


def padded_vocab_size(model_cfg: ModelConfig) -> int:
    """Rows of the embedding and head: vocab_size rounded up to a multiple of model.vocab_pad_multiple
    (a value of 0 is resolved to parallel.tp before the model is built; here it counts as 1)."""
    k = max(model_cfg.vocab_pad_multiple, 1)
    return -(-model_cfg.vocab_size // k) * k


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, vocab_start: int = 0) -> torch.Tensor:
    """logits[..., Vl] of vocabulary rows [vocab_start, vocab_start + Vl) with the rows >= vocab_size
    (padding) set to -inf, so softmax gives them exactly zero probability and gradient."""
    v_local = logits.shape[-1]
    if vocab_start + v_local <= vocab_size:
        return logits
    ids = torch.arange(vocab_start, vocab_start + v_local, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def param_seed(seed: int, name: str) -> int:
    """The generator seed of tensor ``name`` (a dotted name inside the Transformer)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _normal_(t: torch.Tensor, std: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))


PARALLEL_INIT_MIN_ELEMENTS = 1 << 26
"""Models with more weight elements than this draw their tensors on a thread pool (one generator per
tensor, so the values are the sequential ones): torch's CPU normal_ runs on one core, and a 3.58 B
model took 49 s to initialize on one."""


def _draw_all(jobs: list[tuple[torch.Tensor, float, int]], *, workers: int | None = None) -> None:
    """Run ``_normal_`` for every (tensor, std, seed); on a thread pool when the tensors are large."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    total = sum(t.numel() for t, _, _ in jobs)
    workers = workers if workers is not None else min(32, os.cpu_count() or 1)
    if workers <= 1 or total < PARALLEL_INIT_MIN_ELEMENTS:
        for job in jobs:
            _normal_(*job)
        return

    def run(job: tuple[torch.Tensor, float, int]) -> None:
        with torch.no_grad():  # grad mode is per thread
            _normal_(*job)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(run, sorted(jobs, key=lambda j: -j[0].numel())):
            pass


class Transformer(nn.Module):
    """The model of every arch (gpt, mixtral, deepseek_v3); the config picks the parts."""

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, routing_groups: int) -> None:
        super().__init__()
        self.model_cfg, self.moe_cfg = model_cfg, moe_cfg
        h, v = model_cfg.hidden_size, padded_vocab_size(model_cfg)
        self.vocab_size = model_cfg.vocab_size  # rows >= vocab_size (padding) get logit -inf
        self.embed = nn.Embedding(v, h)
        self.layers = nn.ModuleList(
            Block(i, model_cfg, moe_cfg, routing_groups) for i in range(model_cfg.num_layers)
        )
        self.norm = RMSNorm(h, model_cfg.norm_eps)
        self.head = None if model_cfg.tie_embeddings else nn.Linear(h, v, bias=False)
        self.aux_loss: torch.Tensor = torch.zeros(())

    def moe_modules(self) -> list[MoE]:
        """The MoE MLPs, in block order."""
        return [b.mlp for b in self.layers if isinstance(b.mlp, MoE)]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens[B,S] int64 -> logits[B,S,Vp] (padded rows -inf); sets ``self.aux_loss`` (sum of the MoE layers' losses).

        ``positions`` [B,S] int64 (``data.document_mask``): each token's position inside its packed
        document, 0 where a document starts; attention and rotary positions then stay inside each
        document, so every document computes what it computes alone.
        """
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x) if positions is None else block(x, positions)
        x = self.norm(x)
        logits = self.head(x) if self.head is not None else F.linear(x, self.embed.weight)
        # vocab_start: the first row of a tensor-parallel shard (attribute set by parallel.tensor)
        start = getattr(self.head if self.head is not None else self.embed, "vocab_start", 0)
        logits = mask_padded_vocab(logits, self.vocab_size, start)
        aux = torch.zeros((), device=logits.device, dtype=torch.float32)
        for m in self.moe_modules():
            aux = aux + m.aux_loss
        self.aux_loss = aux
        return logits

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Fill every parameter and buffer deterministically from ``seed``.

        Norm scales 1; every other weight N(0, init_std); rotary tables recomputed; expert_bias and
        load_accum zero. Expert e of a GroupedExperts is drawn from its own generator keyed by its
        global id (``first_expert + local index``), so a slice of the experts can be initialized alone.
        """
        self._init_weights(seed, workers=None)

    @torch.no_grad()
    def init_parts(self, seed: int, parts: list[str]) -> None:
        """``init_weights`` restricted to the submodules named in ``parts`` (e.g. ``["embed",
        "layers.3"]``): the values those tensors get from ``init_weights(seed)``."""
        self._init_weights(seed, workers=None, parts=parts)

    @torch.no_grad()
    def _init_weights(self, seed: int, *, workers: int | None, parts: list[str] | None = None) -> None:
        std = self.model_cfg.init_std
        jobs: list[tuple[torch.Tensor, float, int]] = []  # (tensor, std, seed) of every random tensor
        for mod_name, mod in self.named_modules():
            if parts is not None and not any(mod_name == p or mod_name.startswith(p + ".") for p in parts):
                continue
            prefix = f"{mod_name}." if mod_name else ""
            if isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)
            elif isinstance(mod, (nn.Linear, nn.Embedding)):
                jobs.append((mod.weight, std, param_seed(seed, prefix + "weight")))
            elif isinstance(mod, GroupedExperts):
                first = getattr(mod, "first_expert", 0)
                w1, w3 = mod.gate_up()  # views into w13 for SwiGLU: each half keeps its own seed
                for wname, w in (("w1", w1), ("w3", w3), ("w2", mod.w2)):
                    if w is None:
                        continue
                    for i in range(w.shape[0]):
                        jobs.append((w[i], std, param_seed(seed, f"{prefix}{wname}.{first + i}")))
            elif isinstance(mod, RotaryEmbedding):
                mod.reset_tables()
            elif isinstance(mod, Router):
                mod.reset_buffers()
        _draw_all(jobs, workers=workers)


def build_model(model_cfg: ModelConfig, moe_cfg: MoEConfig, *, routing_groups: int | None = None) -> Transformer:
    """Build the transformer (weights uninitialized: call ``init_weights(seed)``).

    routing_groups: groups for node-limited routing; None means moe.num_expert_groups (the runtime
    passes the number of nodes one EP group spans when that is more than one).
    """
    groups = moe_cfg.num_expert_groups if routing_groups is None else routing_groups
    validate_model_build(model_cfg, moe_cfg, groups)
    return Transformer(model_cfg, moe_cfg, groups)
