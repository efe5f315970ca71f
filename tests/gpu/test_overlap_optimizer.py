"""train.overlap_optimizer: the AdamW update on a side stream, block by block, beside the next forward.

Two copies of mixtral_debug in bf16 on CUDA train on the same batches with hpframe's Triton AdamW:
one updates in place as usual, the other through ``SkippableAdamW.overlap_with_forward``. The side
stream is first held back by a sleeping kernel (~25 ms), so a forward that did not wait for its block's
update, or a freed gradient reused while the side stream still reads it, would train on other values.
Losses, parameters and Adam state must be the same bit for bit, through clipping and a skipped step.
Attention runs torch's math kernel so that the reference itself is deterministic. Skipped without CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hpframe.engine.step import SkippableAdamW, forward_units
from hpframe.models import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), tokens[:, 1:].reshape(-1)) + model.aux_loss


def _optimizer(model: torch.nn.Module) -> SkippableAdamW:
    return SkippableAdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def test_overlapped_update_equals_the_in_place_update(compose_cfg) -> None:
    cfg = compose_cfg("recipe=mixtral_debug")
    ref = build_model(cfg.model, cfg.moe)
    ref.init_weights(5)
    ref = ref.cuda()
    for p in ref.parameters():  # the engine's plain bf16 update: bf16 parameters, fp32 buffers
        p.data = p.data.to(torch.bfloat16)
    ovl = copy.deepcopy(ref)
    opt_ref, opt_ovl = _optimizer(ref), _optimizer(ovl)
    units = opt_ovl.overlap_with_forward(ovl)
    assert units == len(forward_units(ovl)) == cfg.model.num_layers + 3  # embed, blocks, norm, head
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, cfg.model.vocab_size, (4, 64), generator=gen).cuda() for _ in range(6)]
    verdicts = [(0.5, 0.0), (1.0, 0.0), (0.25, 1.0), (0.8, 0.0), (1.0, 0.0), (0.6, 0.0)]  # step 3 is skipped
    with sdpa_kernel(SDPBackend.MATH):
        for step, (tokens, (coef, bad)) in enumerate(zip(batches, verdicts)):
            losses = []
            for model, opt, held_back in ((ref, opt_ref, False), (ovl, opt_ovl, True)):
                loss = _loss(model, tokens)
                loss.backward()
                losses.append(float(loss))
                if held_back:
                    with torch.cuda.stream(opt._stream):
                        torch.cuda._sleep(50_000_000)  # the side stream is late: every wait must hold
                opt.control(torch.tensor(coef, device="cuda"), torch.tensor(bad, device="cuda"))
                opt.step()
                opt.control(None)
                opt.zero_grad(set_to_none=True)
            assert losses[0] == losses[1], f"step {step}: loss {losses[1]} with the overlap vs {losses[0]}"
    state = opt_ovl.state_dict()  # waits for the queued update
    for i, (p_ref, p_ovl) in enumerate(zip(ref.parameters(), ovl.parameters())):
        assert torch.equal(p_ref, p_ovl), f"parameter {i} differs"
        s_ref = opt_ref.state[p_ref]
        assert torch.equal(s_ref["exp_avg"], state["state"][i]["exp_avg"]), f"exp_avg {i}"
        assert torch.equal(s_ref["exp_avg_sq"], state["state"][i]["exp_avg_sq"]), f"exp_avg_sq {i}"
        assert float(state["state"][i]["step"]) == float(s_ref["step"]) == 5.0  # six steps, one skipped


def test_wait_for_update_orders_a_read_after_the_update() -> None:
    p = torch.nn.Parameter(torch.ones(1 << 20, device="cuda", dtype=torch.bfloat16))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, device="cuda"))
    model.weight_holder = torch.nn.Module()
    model.weight_holder.register_parameter("w", p)
    opt = SkippableAdamW([p], lr=0.5, weight_decay=0.0, fused=True)
    opt.overlap_with_forward(model)
    p.grad = torch.ones_like(p)
    with torch.cuda.stream(opt._stream):
        torch.cuda._sleep(50_000_000)
    opt.step()
    opt.wait_for_update()
    assert float(p[0]) == pytest.approx(0.5, abs=1e-2)  # 1 - lr * sign(grad) on the first Adam step
