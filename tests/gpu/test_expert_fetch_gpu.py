"""moe.dispatch=experts on CUDA: the fetch's side stream and async NCCL collectives feed the same
kernels as local experts.

One process, one GPU, a one-rank NCCL group (NCCL refuses two ranks on one GPU, and the multi-rank
arithmetic is checked on gloo in tests/dist/test_dispatch_equivalence.py): two bf16 MoE layers whose
experts are ``ExpertFetchExperts`` (the second pre-fetched during the first) against the same layers
with plain ``GroupedExperts`` -- outputs and every gradient equal bit for bit, since the fetched
weights are copies of the same values run through the same grouped GEMMs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from hpframe.config.schema import Activation, MoEConfig
from hpframe.models.moe import MoE

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fetch_on_cuda_matches_local_experts(tmp_path) -> None:
    from hpframe.parallel.expert_fetch import ExpertFetchExperts, FetchGroups

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        cfg = MoEConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_ffn_hidden_size=256)
        g = torch.Generator().manual_seed(0)
        layers = []
        for _ in range(2):
            m = MoE(512, Activation.swiglu, cfg, 1, 256)
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            m.router.reset_buffers()
            layers.append(m.cuda().bfloat16())
        ref = copy.deepcopy(layers)
        fg = FetchGroups(1, 1, None, group)
        for m in layers:
            m.experts = ExpertFetchExperts(m.experts, global_expert_ids=range(8), ep_group=group, ep_size=1,
                                           fetch_groups=fg)
        object.__setattr__(layers[0].experts, "next_fetch", layers[1].experts)
        x = torch.randn(2, 1024, 512, generator=g).cuda().bfloat16()
        outs = []
        for mods in (layers, ref):
            xi = x.clone().requires_grad_(True)
            y = mods[1](mods[0](xi))
            y.float().square().mean().backward()
            outs.append((y, xi.grad))
        torch.cuda.synchronize()
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        for a, b in zip(layers, ref):
            for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
                assert pa.grad is not None and torch.equal(pa.grad, pb.grad), name
        assert fg.counter.prefetched == 1 and fg.counter.calls == 4  # 2 gathers + 2 reduce-scatters
    finally:
        dist.destroy_process_group()
