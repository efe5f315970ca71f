"""The MoE layer implementations compared by ``bench/moe_layer.py``, all built from one weight set.

Shape legend: T tokens, H hidden, F expert inner size, E experts, k top_k, N = T*k assignments.
Every implementation computes the same function: softmax router over E experts, top-k,
renormalized combine weights, SwiGLU experts w2(silu(w1 x) * w3 x), weighted sum of the k outputs.
No shared experts, no aux loss, dropless: the layer is the routed-expert part only.

  loop           plain per-expert Python loop (find each expert's tokens, three matmuls, index_add)
  hpframe        hpframe.models.moe.MoE as it is in the tree (whatever path it takes on CUDA)
  hpframe_fast   the same module run through hpframe.models.moe.moe_forward (the fused GPU path)
  hf_eager       transformers' MixtralSparseMoeBlock, experts_implementation="eager"
  hf_grouped_mm  the same block, experts_implementation="grouped_mm"
  deepspeed      deepspeed.moe.layer.MoE (top-1/top-2 gating only), dropless, no random token selection
  roofline_gemm  the dense equivalent: the nine GEMMs of a SwiGLU MLP fwd+bwd on N rows, called directly
  dense_swiglu   the dense equivalent through autograd: one SwiGLU MLP on N rows (activation included)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inner: int
    num_experts: int
    top_k: int

    def flops(self, num_tokens: int) -> float:
        """Expert matmul FLOPs of forward + backward: 3 matmuls x (fwd 2 + bwd 4) x H x F per assignment."""
        return 18.0 * num_tokens * self.top_k * self.hidden * self.inner


SHAPES = {
    "mixtral": Shape("mixtral", 4096, 14336, 8, 2),
    "dsv2lite": Shape("dsv2lite", 2048, 1408, 64, 6),
    "dsv3": Shape("dsv3", 7168, 2048, 256, 8),
}


@dataclass
class Weights:
    """One weight set: router gate[E,H], w1[E,F,H], w3[E,F,H], w2[E,H,F] (bf16 on the GPU)."""

    gate: torch.Tensor
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor

    @staticmethod
    def random(shape: Shape, device: str, dtype: torch.dtype, seed: int) -> "Weights":
        g = torch.Generator(device=device).manual_seed(seed)
        e, h, f = shape.num_experts, shape.hidden, shape.inner

        def rnd(*size: int, std: float) -> torch.Tensor:
            return (torch.randn(*size, device=device, generator=g) * std).to(dtype)

        # 1/sqrt(fan_in) keeps activations O(1); the router gets a larger scale so its softmax is not flat.
        return Weights(rnd(e, h, std=h**-0.5 * 4), rnd(e, f, h, std=h**-0.5), rnd(e, f, h, std=h**-0.5),
                       rnd(e, h, f, std=f**-0.5))

    def to(self, dtype: torch.dtype) -> "Weights":
        return Weights(self.gate.to(dtype), self.w1.to(dtype), self.w3.to(dtype), self.w2.to(dtype))


def route(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 softmax router: (topk_idx[T,k], topk_weight[T,k] renormalized, fp32)."""
    probs = F.linear(x.float(), gate.float()).softmax(-1)
    w, idx = probs.topk(top_k, dim=-1)
    return idx, w / w.sum(-1, keepdim=True)


class LoopMoE(nn.Module):
    """The plain per-expert loop: for each expert, find its (token, slot) pairs and run its MLP.

    As the numerical reference (``reference=True``) it holds the bf16 weights without gradients and
    computes in fp32, upcasting one expert at a time (an fp32 copy of DeepSeek-V3's experts would
    take 45 GB).
    """

    def __init__(self, w: Weights, top_k: int, *, reference: bool = False) -> None:
        super().__init__()
        self.top_k, self.reference = top_k, reference
        params = [w.gate, w.w1, w.w3, w.w2] if reference else [t.clone() for t in (w.gate, w.w1, w.w3, w.w2)]
        self.gate, self.w1, self.w3, self.w2 = (nn.Parameter(t, requires_grad=not reference) for t in params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx, wt = route(x, self.gate, self.top_k)
        y = torch.zeros_like(x)
        cd = torch.float32 if self.reference else x.dtype
        for e in range(self.w1.shape[0]):
            tok, slot = torch.where(idx == e)  # host sync per expert: this is the naive baseline
            if tok.numel() == 0:
                continue
            xe = x[tok].to(cd)
            w1, w3, w2 = self.w1[e].to(cd), self.w3[e].to(cd), self.w2[e].to(cd)
            he = F.silu(xe @ w1.t()) * (xe @ w3.t())
            ye = (he @ w2.t()) * wt[tok, slot, None].to(cd)
            y = y.index_add(0, tok, ye.to(x.dtype))
        return y


def build_hpframe(w: Weights, shape: Shape) -> nn.Module:
    """hpframe's MoE module (routed experts only, dropless, no aux loss) holding the weight set."""
    from hpframe.config.schema import Activation, MoEConfig
    from hpframe.models.moe import MoE

    cfg = MoEConfig(num_experts=shape.num_experts, top_k=shape.top_k, expert_ffn_hidden_size=shape.inner,
                    dropless=True, aux_loss_coef=0.0, norm_topk_prob=True)
    m = MoE(shape.hidden, Activation.swiglu, cfg, routing_groups=1, ffn=shape.inner)
    m = m.to(device=w.w1.device, dtype=w.w1.dtype)
    with torch.no_grad():
        m.router.gate.weight.copy_(w.gate)
        m.experts.w13.copy_(torch.cat([w.w1, w.w3], dim=1))  # gate rows, then up rows
        m.experts.w2.copy_(w.w2)
        m.router.reset_buffers()
    return _Flat3d(m)


class _Flat3d(nn.Module):
    """Adapts a [B,S,H] module to the benchmark's [T,H] calling convention (B=1)."""

    def __init__(self, inner: nn.Module, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.inner, self.fn = inner, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x3 = x.unsqueeze(0)
        y = self.fn(self.inner, x3) if self.fn is not None else self.inner(x3)
        y = y[0] if isinstance(y, tuple) else y  # DeepSpeed returns (output, l_aux, exp_counts)
        return y.reshape_as(x)


def build_hpframe_fast(w: Weights, shape: Shape) -> nn.Module:
    from hpframe.models.moe import moe_forward

    flat = build_hpframe(w, shape)
    return _Flat3d(flat.inner, moe_forward)


def build_hf(w: Weights, shape: Shape, impl: str) -> nn.Module:
    """transformers' MixtralSparseMoeBlock configured to the shape, experts_implementation=impl."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=shape.hidden, intermediate_size=shape.inner,
                        num_local_experts=shape.num_experts, num_experts_per_tok=shape.top_k,
                        router_jitter_noise=0.0)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg).to(device=w.w1.device, dtype=w.w1.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(w.gate)
        block.experts.gate_up_proj.copy_(torch.cat([w.w1, w.w3], dim=1))  # [E, 2F, H]: gate rows first
        block.experts.down_proj.copy_(w.w2)
    return _Flat3d(block)


class _SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w3 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def init_deepspeed_single() -> None:
    """A one-process NCCL world for DeepSpeed's MoE groups (its layer needs torch.distributed)."""
    import deepspeed

    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")}.items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl", verbose=False)


def build_deepspeed(w: Weights, shape: Shape) -> nn.Module:
    """deepspeed.moe.layer.MoE: top-k gating (k <= 2), dropless (drop_tokens=False), use_rts=False."""
    from deepspeed.moe.layer import MoE as DSMoE

    if shape.top_k > 2:
        raise ValueError(f"DeepSpeed's MoE gate supports top-1/top-2, not top_k={shape.top_k}")
    layer = DSMoE(hidden_size=shape.hidden, expert=_SwiGLU(shape.hidden, shape.inner),
                  num_experts=shape.num_experts, ep_size=1, k=shape.top_k, capacity_factor=1.0,
                  eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False, use_rts=False,
                  top2_2nd_expert_sampling=False)
    layer = layer.to(device=w.w1.device, dtype=w.w1.dtype)
    with torch.no_grad():
        gate = layer.deepspeed_moe.gate.wg
        gate.float()  # DeepSpeed's gate computes in fp32 and converts itself on first use
        gate.weight.data = w.gate.float().clone()
        experts = layer.deepspeed_moe.experts.deepspeed_experts
        for e, ex in enumerate(experts):
            ex.w1.weight.copy_(w.w1[e])
            ex.w3.weight.copy_(w.w3[e])
            ex.w2.weight.copy_(w.w2[e])
    return _Flat3d(layer)


class DenseSwiGLU(nn.Module):
    """The dense equivalent through autograd: one SwiGLU MLP applied to the N = T*k rows."""

    def __init__(self, w: Weights, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.w1, self.w3, self.w2 = (nn.Parameter(t[0].clone()) for t in (w.w1, w.w3, w.w2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xr = x.repeat_interleave(self.top_k, dim=0)  # [N,H] the rows the experts would see
        y = F.linear(F.silu(F.linear(xr, self.w1)) * F.linear(xr, self.w3), self.w2)
        return y.view(x.shape[0], self.top_k, -1).sum(1)  # [T,H] like a layer's output


def roofline_gemm_step(w: Weights, shape: Shape, num_tokens: int) -> Callable[[], None]:
    """The nine GEMMs of one SwiGLU MLP forward+backward on N rows, issued directly (no autograd,
    no activation): the dense-equivalent matmul chain of the same FLOPs."""
    n, h, f = num_tokens * shape.top_k, shape.hidden, shape.inner
    dev, dt = w.w1.device, w.w1.dtype
    x = torch.randn(n, h, device=dev, dtype=dt)
    gy = torch.randn(n, h, device=dev, dtype=dt)
    w1, w3, w2 = w.w1[0], w.w3[0], w.w2[0]  # [F,H], [F,H], [H,F]
    a = torch.randn(n, f, device=dev, dtype=dt)  # stands for silu(h1)*h3 and its gradients

    def step() -> None:
        h1 = x @ w1.t()  # fwd [N,F]
        h3 = x @ w3.t()
        y = a @ w2.t()  # fwd [N,H]
        ga = gy @ w2  # bwd dgrad [N,F]
        gw2 = gy.t() @ a  # bwd wgrad [H,F]
        gx = h1 @ w1 + h3 @ w3  # bwd dgrad of w1, w3 (two GEMMs; the add is tiny next to them)
        gw1 = h1.t() @ x  # wgrad [F,H]
        gw3 = h3.t() @ x
        del y, ga, gw2, gx, gw1, gw3

    return step
