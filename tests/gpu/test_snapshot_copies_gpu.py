"""Snapshot copies on a side stream (hpframe/checkpoint/host_copy.py): consistent while training goes on.

One GPU (NCCL, world size 1), mixtral_debug, for bf16 with fp32 master weights under ZeRO 1
(BF16_Optimizer's flat partitions) and fp32 under ZeRO 0 (the parameters themselves). After one step,
a capture with ``HPFRAME_SYNC_SNAPSHOT=1`` (blocking copies on the training thread) is the reference.
The side stream is then held back (a 2e9-cycle device sleep queued on it) and a second capture is
taken: it returns with its copies still pending (its event not reached), and the next training step
is enqueued at once. That step's update must wait for the copies: the captured values equal the
reference bit for bit (without the wait, the update overwrites the state before the held-back copies
read it), and the weights after the step equal those of an engine trained the same two steps
without a snapshot. A third capture, after the second part is released, reuses its pinned buffer
(no new registration). Skipped without CUDA.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_fixtures import one_gpu_process_group  # noqa: E402,F401  (a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = [["train.dtype=bf16", "parallel.zero_stage=1"], ["train.dtype=fp32", "parallel.zero_stage=0"]]


def test_side_stream_snapshot_is_consistent_while_training_goes_on(one_gpu_process_group, monkeypatch) -> None:
    from conftest import compose_run_config
    from engine_cases import build_rank_engine, rank_batches
    from test_library_internals import BASE, _master_weights

    from hpframe.checkpoint import host_copy, reshard

    groups = None
    for case in CASES:
        cfg = compose_run_config(*BASE, "train.device=cuda", *case)
        reference_engine, plan, groups = build_rank_engine(cfg, groups)
        for step in range(2):
            reference_engine.train_step(rank_batches(cfg, plan, 0, step))
        after_two = _master_weights(reference_engine.ds)

        engine, plan, groups = build_rank_engine(cfg, groups)
        engine.train_step(rank_batches(cfg, plan, 0, 0))
        monkeypatch.setenv("HPFRAME_SYNC_SNAPSHOT", "1")
        ref = reshard.capture(engine)
        monkeypatch.delenv("HPFRAME_SYNC_SNAPSHOT")
        assert ref.copied is None

        device = next(engine.ds.module.parameters()).device
        with torch.cuda.stream(host_copy.copy_stream(device)):
            torch.cuda._sleep(2_000_000_000)  # holds the copies back past the next step's enqueueing
        part = reshard.capture(engine)
        assert part.copied is not None and not part.copied.query(), case  # returned before copying
        engine.train_step(rank_batches(cfg, plan, 0, 1))
        part.wait_copied()
        assert [(p.name, p.kind) for p in part.pieces] == [(p.name, p.kind) for p in ref.pieces]
        for mine, theirs in zip(part.pieces, ref.pieces):
            assert mine.tensor.dtype == torch.float32 and mine.tensor.is_pinned(), (mine.name, mine.kind)
            assert torch.equal(mine.tensor, theirs.tensor), (case, mine.name, mine.kind)
        assert part.adam_step == ref.adam_step
        weights = _master_weights(engine.ds)
        assert all(torch.equal(weights[n], after_two[n]) for n in after_two), case

        registered = host_copy.POOL.registered_bytes
        del part
        gc.collect()
        again = reshard.capture(engine)
        again.wait_copied()
        assert host_copy.POOL.registered_bytes == registered, case  # the released buffer was reused
