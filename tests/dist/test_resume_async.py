"""Asynchronous saves (``Checkpointer(async_save=True)``) on 2 CPU processes (gloo, dp2, ZeRO-1, mixtral_debug).

Compared: the tensors of an asynchronous save whose background write overlaps the next optimizer step
with those of a synchronous save of the same state (bit for bit: the snapshot is taken before
``save`` returns); the committed directories at fixed points (when the second asynchronous save
returns, the first is committed: at most one save in flight; after ``close`` the second is, and
``latest`` names it); a failing background write raises from the next ``wait``/``close`` on every rank
with the error of the file system, and nothing is committed; a write failing on one rank only makes
every rank raise at close (rank 0 stops waiting for the missing part), and nothing is committed; each
rank writes its own ZeRO partition (the two ranks' tensor files are of near equal size).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import compose_run_config  # noqa: E402
from hpframe.checkpoint import store  # noqa: E402
from hpframe.checkpoint.portable import PortableCheckpoint, tensor_file  # noqa: E402
from hpframe.testing.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.dist


def _worker(rank: int, world_size: int, cfg, root: str) -> dict:
    from hpframe.checkpoint import store
    from hpframe.checkpoint.async_save import Checkpointer
    from hpframe.data import build_data
    from hpframe.engine import build_engine
    from hpframe.engine.ds_env import prepare_deepspeed
    from hpframe.models import build_model
    from hpframe.parallel import init_distributed, parallelize
    from hpframe.plan import make_plan
    from hpframe.train.loop import as_pairs

    prepare_deepspeed()
    plan = make_plan(cfg, world_size)
    groups = init_distributed(plan)
    model = build_model(cfg.model, cfg.moe)
    model.init_weights(cfg.train.seed)
    engine = build_engine(parallelize(model, plan, groups), plan, groups, cfg)
    data = build_data(cfg, plan, rank)
    out: dict = {}
    engine.train_step(as_pairs(data.train.next_step()))
    sync = Checkpointer(engine, Path(root) / "sync")
    sync.save(1, {"step": 1})
    ckpt = Checkpointer(engine, Path(root) / "async", async_save=True)
    first = ckpt.save(1, {"step": 1})
    engine.train_step(as_pairs(data.train.next_step()))  # overlaps the background write of step 1
    second = ckpt.save(2, {"step": 2})
    out["committed_when_second_returned"] = [p.name for p in store.committed(Path(root) / "async")]
    engine.train_step(as_pairs(data.train.next_step()))
    ckpt.close()
    out["latest"] = (Path(root) / "async" / "latest").read_text().strip()
    out["stall"] = (first.stall_s, second.stall_s, second.snapshot_s, second.waited_s)

    (Path(root) / "blocked").write_text("a file where the checkpoint root should be")
    broken = Checkpointer(engine, Path(root) / "blocked", async_save=True)
    broken.save(3, {"step": 3})
    try:
        broken.close()
    except OSError as err:
        out["error"] = f"{type(err).__name__}: {err}"

    # a write that fails on rank 1 only: both ranks raise at close (no rank left waiting), nothing committed
    one = Checkpointer(engine, Path(root) / "one", async_save=True)
    if rank == 1:
        def failing(*args, **kwargs):
            raise OSError("disk full (injected on rank 1)")
        one._persist = failing
    one.save(4, {"step": 4})
    try:
        one.close()
    except (OSError, store.CheckpointError) as err:
        out["one_error"] = f"{type(err).__name__}: {err}"
    return out


def test_async_save_snapshot_order_and_errors(tmp_path):
    cfg = compose_run_config("recipe=mixtral_debug", "parallel.dp=2", "parallel.zero_stage=1", "parallel.micro_batch_size=2",
                             "parallel.grad_accum=1", "data.seq_len=32", "data.num_synthetic_tokens=50000", "train=smoke")
    results = run_distributed(_worker, 2, (cfg, str(tmp_path)), timeout=150)
    for r in results:
        assert r["committed_when_second_returned"][0] == "step_00000001"
        assert r["latest"] == "step_00000002"
        assert all(x >= 0 for x in r["stall"])
        assert "blocked" in r["error"] and ("NotADirectoryError" in r["error"] or "FileExistsError" in r["error"])
        assert "injected on rank 1" in r["one_error"] or "rank1 could not write" in r["one_error"], r["one_error"]
    assert store.committed(tmp_path / "one") == []
    a = PortableCheckpoint(tmp_path / "async" / "step_00000001")
    s = PortableCheckpoint(tmp_path / "sync" / "step_00000001")
    assert set(a.shapes) == set(s.shapes) and len(a.shapes) > 20
    for kind, name in a.shapes:
        assert torch.equal(a.read(name, kind), s.read(name, kind)), (kind, name)
    assert not (tmp_path / "blocked").is_dir()
    # every rank wrote its own ZeRO partition (fragments, nothing gathered): the two files are near equal
    sizes = [(tmp_path / "sync" / "step_00000001" / tensor_file(r)).stat().st_size for r in (0, 1)]
    assert min(sizes) > 0.4 * sum(sizes), sizes
