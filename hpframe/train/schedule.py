"""Learning-rate schedule: linear warmup, then cosine decay to min_lr."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    Warmup: steps 0 .. warmup_steps-1 use ``lr * (step + 1) / warmup_steps`` (the first step already
    moves the weights; the last warmup step reaches ``lr``). Decay: from ``lr`` at step ``warmup_steps - 1``
    along a half cosine to ``min_lr`` at the last step ``total_steps - 1``. Steps past the end stay at min_lr.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps  # steps warmup_steps-1 .. total_steps-1 span this many intervals
    if decay_steps <= 0:  # the run ends inside warmup; only steps past the end land here
        return min_lr
    progress = min(1.0, (step - warmup_steps + 1) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
