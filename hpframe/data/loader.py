"""Deterministic, data-parallel-sharded batches of token sequences, with a resumable position.

Sampling order: global sample ``g`` (0, 1, 2, ... over the whole run) is training sequence
``perm_e[g mod n]`` with epoch ``e = g // n`` and ``perm_e`` a permutation of the ``n`` training
sequences seeded by ``(data.seed, e)``. Step ``s`` consumes global samples
``[s * B, (s + 1) * B)`` with ``B = micro_batch_size * grad_accum * dp`` (the global batch).

Sharding: the global batch is cut into ``dp * grad_accum`` micro-batches of ``micro_batch_size``
consecutive samples; data-parallel rank ``d`` gets micro-batches ``d * grad_accum .. d * grad_accum +
grad_accum - 1`` in order. All TP/PP ranks of one dp index therefore see the same micro-batches, the
union over dp is the global batch, and a single process with ``grad_accum * dp`` micro-batches sees
exactly the same sequences in the same order.

The loader's position (``consumed_samples``) is part of the training state: ``state_dict()`` after a
step and ``load_state_dict()`` on resume continue with the next unseen batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hpframe.data.dataset import SequenceSplit
from hpframe.errors import UserError


class ShardedLoader:
    """Yields, per optimizer step, this dp rank's micro-batches: int64 tensors [micro_batch_size, seq_len + 1]."""

    def __init__(
        self, split: SequenceSplit, *, micro_batch_size: int, grad_accum: int, dp: int, dp_rank: int, seed: int
    ) -> None:
        assert 0 <= dp_rank < dp, (dp_rank, dp)
        self.split = split
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.dp = dp
        self.dp_rank = dp_rank
        self.seed = seed
        self.global_batch_size = micro_batch_size * grad_accum * dp
        self.consumed_samples = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.split.num_sequences)
            self._perm_epoch = epoch
        return self._perm

    def sequence_indices(self, first_sample: int, count: int) -> np.ndarray:
        """Training-sequence indices of global samples ``[first_sample, first_sample + count)``."""
        n = self.split.num_sequences
        out = np.empty(count, dtype=np.int64)
        for j, g in enumerate(range(first_sample, first_sample + count)):
            out[j] = self._permutation(g // n)[g % n]
        return out

    def step_indices(self, consumed_samples: int) -> list[np.ndarray]:
        """This rank's micro-batches (sequence indices) for the step starting at ``consumed_samples``."""
        first = consumed_samples + self.dp_rank * self.grad_accum * self.micro_batch_size
        idx = self.sequence_indices(first, self.grad_accum * self.micro_batch_size)
        return list(idx.reshape(self.grad_accum, self.micro_batch_size))

    def next_step(self) -> list[torch.Tensor]:
        """This rank's ``grad_accum`` micro-batches for the next step; advances the position by one global batch."""
        batches = [torch.from_numpy(self.split.batch(ix)) for ix in self.step_indices(self.consumed_samples)]
        self.consumed_samples += self.global_batch_size
        return batches

    def state_dict(self) -> dict[str, Any]:
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_sequences": self.split.num_sequences,
            "seq_len": self.split.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. The data (seed, split size, seq_len) must be the one the state was saved with."""
        for key, mine in (("seed", self.seed), ("num_sequences", self.split.num_sequences), ("seq_len", self.split.seq_len)):
            if state[key] != mine:
                raise UserError(
                    f"cannot resume the data loader: checkpoint has {key}={state[key]}, this run has {key}={mine} "
                    "(data.seed, data.seq_len and the dataset must match the checkpoint's)"
                )
        self.consumed_samples = int(state["consumed_samples"])


def eval_batches(split: SequenceSplit, *, micro_batch_size: int, num_batches: int, dp: int, dp_rank: int) -> list[torch.Tensor]:
    """The fixed held-out micro-batches of one dp rank: sequences taken in order, wrapping around the split.

    Every evaluation uses the same batches, so eval losses of different steps are comparable.
    """
    n = split.num_sequences
    first = dp_rank * num_batches * micro_batch_size
    idx = (first + np.arange(num_batches * micro_batch_size)) % n
    return [torch.from_numpy(split.batch(ix)) for ix in idx.reshape(num_batches, micro_batch_size)]
