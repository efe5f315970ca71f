"""The debug models on a CUDA GPU against the same weights on the CPU.

Compared: logits and parameter gradients of mixtral_debug and deepseek_debug computed on CUDA in
fp32 (MoE through moe_gpu with the padded-bmm experts) against the CPU fp32 model (loop experts);
the loss in bf16 on CUDA (grouped_mm experts, Triton kernels) against the CPU fp32 loss; and a few
bf16 AdamW steps on one batch lower the loss. Skipped without a CUDA device.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hpframe.models import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), tokens[:, 1:].reshape(-1)) + model.aux_loss


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).norm() / b.detach().float().cpu().norm())


@pytest.mark.parametrize("recipe", ["mixtral_debug", "deepseek_debug"])
def test_cuda_fp32_matches_cpu(compose_cfg, recipe: str) -> None:
    cfg = compose_cfg(f"recipe={recipe}")
    cpu = build_model(cfg.model, cfg.moe)
    cpu.init_weights(7)
    gpu = copy.deepcopy(cpu).cuda()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    lc, lg = _loss(cpu, tokens), _loss(gpu, tokens.cuda())
    lc.backward()
    lg.backward()
    assert abs(lg.item() - lc.item()) < 1e-4 * abs(lc.item())
    assert _rel(gpu(tokens.cuda()), cpu(tokens)) < 1e-4
    for (name, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if pc.grad is None:
            assert pg.grad is None, name
            continue
        if pc.grad.norm() > 0:
            assert _rel(pg.grad, pc.grad) < 1e-3, name


@pytest.mark.parametrize("recipe", ["mixtral_debug", "deepseek_debug"])
def test_cuda_bf16_loss_close_and_training_lowers_it(compose_cfg, recipe: str) -> None:
    cfg = compose_cfg(f"recipe={recipe}")
    cpu = build_model(cfg.model, cfg.moe)
    cpu.init_weights(11)
    gpu = copy.deepcopy(cpu).cuda().bfloat16()
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lc = float(_loss(cpu, tokens))
        lg = float(_loss(gpu, tokens.cuda()))
    assert abs(lg - lc) < 2e-2 * abs(lc)
    opt = torch.optim.AdamW(gpu.parameters(), lr=3e-3, fused=True)
    losses = []
    for _ in range(8):
        loss = _loss(gpu, tokens.cuda())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5
