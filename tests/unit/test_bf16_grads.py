"""hpframe's gradient hand-over for DeepSpeed's BF16_Optimizer gives what DeepSpeed's own gives.

DeepSpeed zero-fills every fp32 gradient buffer after each step and then accumulates into it;
hpframe's ``update_hp_grads`` copies the first gradient of a step and zeroes the buffer of a parameter
without one, so its ``clear_hp_grads`` need not fill. Checked here on a BF16_Optimizer holding only
the state these methods touch (its constructor needs a process group and a model): a parameter whose
gradient is missing in a micro-batch, in a whole step, or in the step before, with the buffers left
holding stale values. The full path (ZeRO-1 and ZeRO-2 bf16 agreeing, exact resume) is in tests/dist.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

from hpframe.engine import bf16_grads


def _optimizer() -> tuple[BF16_Optimizer, list[torch.nn.Parameter]]:
    lps = [torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16)) for _ in range(2)]
    opt = BF16_Optimizer.__new__(BF16_Optimizer)  # bypass the constructor: only the hand-over state
    opt.immediate_grad_update = False
    opt.autoep_folding_tp_group = None
    opt._uses_muon = False
    opt.clip_grad = 0.0
    opt.optimizer = torch.optim.AdamW(lps)  # not hpframe's: no fused bf16 copy
    opt.bf16_groups = [lps]
    flat = torch.full((24,), 7.0)  # stale values everywhere
    opt.fp32_groups_gradients_flat = [flat]
    opt.fp32_groups_gradients = [[flat[:12].view(4, 3), flat[12:].view(4, 3)]]
    opt.fp32_groups_has_gradients = [[False, False]]
    assert bf16_grads.install(opt)
    return opt, lps


def test_hand_over_equals_zero_then_accumulate() -> None:
    opt, (a, b) = _optimizer()
    hp_a, hp_b = opt.fp32_groups_gradients[0]
    ones = torch.ones(4, 3, dtype=torch.bfloat16)
    # step 1: a in both micro-batches, b only in the second
    a.grad, b.grad = ones, None
    opt.update_hp_grads()
    assert torch.equal(hp_a, torch.ones(4, 3)) and torch.equal(hp_b, torch.zeros(4, 3))
    a.grad, b.grad = 2 * ones, 3 * ones
    opt.update_hp_grads()
    assert torch.equal(hp_a, torch.full((4, 3), 3.0)) and torch.equal(hp_b, torch.full((4, 3), 3.0))
    assert opt.fp32_groups_has_gradients == [[True, True]]
    opt.clear_hp_grads()
    assert opt.fp32_groups_has_gradients == [[False, False]]
    # step 2: a has no gradient at all, b one
    a.grad, b.grad = None, 5 * ones
    opt.update_hp_grads()
    a.grad, b.grad = None, None
    opt.update_hp_grads()
    assert torch.equal(hp_a, torch.zeros(4, 3)) and torch.equal(hp_b, torch.full((4, 3), 5.0))
    assert opt.fp32_groups_has_gradients == [[False, True]]


def test_clear_does_not_fill_and_the_next_hand_over_overwrites() -> None:
    opt, (a, b) = _optimizer()
    hp_a, _ = opt.fp32_groups_gradients[0]
    a.grad = b.grad = torch.full((4, 3), 0.5, dtype=torch.bfloat16)
    opt.update_hp_grads()
    opt.clear_hp_grads()
    assert torch.equal(hp_a, torch.full((4, 3), 0.5))  # left as it was: no zero fill
    a.grad = torch.full((4, 3), 0.25, dtype=torch.bfloat16)
    opt.update_hp_grads()
    assert torch.equal(hp_a, torch.full((4, 3), 0.25))  # copied, not added to the stale 0.5
