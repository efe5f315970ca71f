"""Saves that fail on one rank (2 CPU processes, gloo, gpt_debug, dp2, ZeRO-1).

A rank that dies in the middle of an asynchronous save.

Ranks started as by hand (no torchrun to stop the others). Rank 1 takes its part of the snapshot, then
dies (SIGKILL) before writing its files. Compared with what the save protocol promises: rank 0's
``close`` ends with a CheckpointError naming rank 1 and ``checkpoint.save_timeout_s``, well within the
test's timeout (the previous protocol waited 30 minutes); nothing is committed; the staging directory
holds rank 0's part only. The bound comes from the config through the plan.

A disk error on one rank in a synchronous save (rank 1's part write raises ENOSPC; the bound is 600 s,
so a wait for it would outlast the test's timeout): both ranks' ``save`` raise at once, rank 1 its
OSError, rank 0 a CheckpointError naming rank 1 and the error; nothing is committed; the next save,
with the disk back, commits on both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import compose_run_config  # noqa: E402
from hpframe.checkpoint import store  # noqa: E402
from hpframe.testing.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.dist


def _worker(rank: int, world_size: int, cfg, root: str) -> None:
    import os
    import signal

    from engine_cases import build_rank_engine

    from hpframe.checkpoint.async_save import Checkpointer
    from hpframe.data import build_data
    from hpframe.engine.ds_env import prepare_deepspeed
    from hpframe.train.loop import as_pairs, save_timeout

    prepare_deepspeed()
    engine, plan, _ = build_rank_engine(cfg)
    data = build_data(cfg, plan, rank)
    engine.train_step(as_pairs(data.train.next_step()))
    ckpt = Checkpointer(engine, Path(root) / "ckpt", async_save=True, timeout_s=save_timeout(plan))
    if rank == 1:  # dies after the snapshot, before its files are written
        ckpt._persist = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    ckpt.save(1, {"step": 1})
    engine_done = {"timeout_s": ckpt.timeout_s}
    try:
        ckpt.close()
    except store.CheckpointError as err:
        engine_done["error"] = str(err)
    (Path(root) / f"rank{rank}.json").write_text(json.dumps(engine_done))


def test_a_rank_dying_mid_save_ends_the_save_with_its_name(tmp_path):
    cfg = compose_run_config("recipe=gpt_debug", "parallel.dp=2", "parallel.zero_stage=1", "parallel.micro_batch_size=2",
                             "parallel.grad_accum=1", "data.seq_len=32", "data.num_synthetic_tokens=50000", "train=smoke",
                             "checkpoint.save_timeout_s=3")
    with pytest.raises(RuntimeError, match=r"rank 1: no result \(exit code -9\)"):
        run_distributed(_worker, 2, (cfg, str(tmp_path)), timeout=90)
    seen = json.loads((tmp_path / "rank0.json").read_text())
    assert seen["timeout_s"] == 3.0
    assert "ranks [1] did not finish writing their parts within 3 s (checkpoint.save_timeout_s)" in seen["error"], seen
    assert store.committed(tmp_path / "ckpt") == []
    staging = store.staging_path(tmp_path / "ckpt", store.tag_for_step(1))
    assert sorted(p.name for p in (staging / "layout").iterdir()) == ["rank00000.json"]


def _disk_full_worker(rank: int, world_size: int, cfg, root: str) -> dict:
    import errno

    from engine_cases import build_rank_engine

    from hpframe.checkpoint import async_save
    from hpframe.checkpoint.async_save import Checkpointer
    from hpframe.data import build_data
    from hpframe.engine.ds_env import prepare_deepspeed
    from hpframe.train.loop import as_pairs

    prepare_deepspeed()
    engine, plan, _ = build_rank_engine(cfg)
    data = build_data(cfg, plan, rank)
    engine.train_step(as_pairs(data.train.next_step()))
    ckpt = Checkpointer(engine, Path(root) / "ckpt", async_save=False, timeout_s=600)
    real_write = async_save.write_part
    if rank == 1:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        async_save.write_part = full
    out: dict = {}
    try:
        ckpt.save(1, {"step": 1})
    except (OSError, store.CheckpointError) as err:
        out["error"] = (type(err).__name__, str(err))
    out["committed_after_failure"] = [p.name for p in store.committed(Path(root) / "ckpt")]
    async_save.write_part = real_write
    engine.train_step(as_pairs(data.train.next_step()))  # both ranks go on together
    ckpt.save(2, {"step": 2})
    out["committed"] = [p.name for p in store.committed(Path(root) / "ckpt")]
    return out


@pytest.mark.timeout(150)
def test_a_disk_error_on_one_rank_fails_the_sync_save_on_every_rank_together(tmp_path):
    cfg = compose_run_config("recipe=gpt_debug", "parallel.dp=2", "parallel.zero_stage=1", "parallel.micro_batch_size=2",
                             "parallel.grad_accum=1", "data.seq_len=32", "data.num_synthetic_tokens=50000", "train=smoke")
    r0, r1 = run_distributed(_disk_full_worker, 2, (cfg, str(tmp_path)), timeout=120)
    assert r1["error"] == ("OSError", "[Errno 28] No space left on device"), r1
    assert r0["error"][0] == "CheckpointError", r0
    assert ("checkpoint save of step 1: writing the parts failed on rank 1: OSError: [Errno 28] No space left on device; "
            "not committed") in r0["error"][1], r0
    assert r0["committed_after_failure"] == r1["committed_after_failure"] == []
    assert r0["committed"] == r1["committed"] == [store.tag_for_step(2)]
