"""A rank that dies in the middle of an asynchronous save (2 CPU processes, gloo, gpt_debug, dp2, ZeRO-1).

Ranks started as by hand (no torchrun to stop the others). Rank 1 takes its part of the snapshot, then
dies (SIGKILL) before writing its files. Compared with what the save protocol promises: rank 0's
``close`` ends with a CheckpointError naming rank 1 and ``checkpoint.save_timeout_s``, well within the
test's timeout (the previous protocol waited 30 minutes); nothing is committed; the staging directory
holds rank 0's part only. The bound comes from the config through the plan.
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
