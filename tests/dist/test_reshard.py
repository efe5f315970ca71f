"""Re-sharding on CPU (gloo, fp32): a checkpoint saved under one layout resumes under others.

Compared: a mixtral_debug run under edp2 x ep2 with ZeRO-1 (4 processes) that saves at step N and
trains on to N + M, with runs resumed from its step-N checkpoint under
  tp2 x pp2, ZeRO-0 (4 processes: ep 2 -> 1, dp 4 -> 1, tp 1 -> 2, pp 1 -> 2)
  dp2 x ep2, ZeRO-2 (2 processes: dp 4 -> 2, ZeRO 1 -> 2)
Their losses of steps N+1..N+M and their final weights and Adam moments equal the never-re-sharded
run's within 1e-5 relative (reductions run in another order, so not bit for bit). Also: loading that
checkpoint into a model with another ffn size fails with a ValueError naming the mis-shaped tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_resume import N, M, SMALL, train_in_process  # noqa: E402
from conftest import compose_run_config  # noqa: E402
from hpframe.checkpoint.portable import PortableCheckpoint  # noqa: E402
from hpframe.testing.distributed import run_distributed  # noqa: E402

pytestmark = pytest.mark.dist
TOL = 1e-5
# the same global batch (16 sequences in micro-batches of 2) in every layout: grad_accum follows dp
BASE = ["recipe=mixtral_debug", *SMALL, "checkpoint.keep_last=0", "parallel.global_batch_size=16", "parallel.grad_accum=-1"]


def _runs(rank: int, world_size: int, cfgs: list, bad_cfg=None) -> dict:
    out = {"losses": [train_in_process(rank, world_size, cfg) for cfg in cfgs]}
    if bad_cfg is not None:
        try:
            train_in_process(rank, world_size, bad_cfg)
        except ValueError as err:
            out["error"] = str(err)
    return out


def _resumed(tmp_path: Path, name: str, overrides: list[str]):
    cfg = compose_run_config(*BASE, *overrides, "checkpoint.interval=0", "train.seed=999",
                             f"checkpoint.resume={tmp_path / 'a' / 'checkpoints' / f'step_{N:08d}'}")
    cfg.output_dir = str(tmp_path / name)
    return cfg


def _close(a: Path, b: Path) -> float:
    """Largest relative difference over every tensor of two portable checkpoints (same names required)."""
    ca, cb = PortableCheckpoint(a), PortableCheckpoint(b)
    assert set(ca.shapes) == set(cb.shapes)
    assert ca.adam_step == cb.adam_step
    worst = 0.0
    for kind, name in ca.shapes:
        x, y = ca.read(name, kind), cb.read(name, kind)
        worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)))
    return worst


def test_reshard_across_dp_ep_tp_pp_and_zero(tmp_path):
    a = compose_run_config(*BASE, "parallel.dp=4", "parallel.ep=2", "parallel.zero_stage=1", f"checkpoint.interval={N}",
                           "checkpoint.resume=none")
    a.output_dir = str(tmp_path / "a")
    b = _resumed(tmp_path, "b", ["parallel.tp=2", "parallel.pp=2", "parallel.dp=1", "parallel.zero_stage=0"])
    (ref, res_b) = run_distributed(_runs, 4, ([a, b],), timeout=200)[0]["losses"]
    c = _resumed(tmp_path, "c", ["parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=2"])
    bad = _resumed(tmp_path, "bad", ["parallel.dp=2", "model.ffn_hidden_size=192"])
    out = run_distributed(_runs, 2, ([c], bad), timeout=200)[0]
    res_c = out["losses"][0]

    final = f"step_{N + M:08d}"
    for name, res in (("b", res_b), ("c", res_c)):
        assert len(res) == M
        for x, y in zip(res, ref[N:]):
            assert x == pytest.approx(y, rel=TOL), (name, res, ref[N:])
        assert _close(tmp_path / "a" / "checkpoints" / final, tmp_path / name / "checkpoints" / final) < TOL, name
    # the layouts really differ: files of b were written by tp/pp coordinates, c's experts in two halves
    saved_b = PortableCheckpoint(tmp_path / "b" / "checkpoints" / final).saved_coords
    assert {c["pp"] for c in saved_b.values()} == {0, 1}
    assert "does not fit this model" in out["error"]
    assert "layers.0.mlp.experts.w13: checkpoint [8, 512, 128] vs model [8, 384, 128]" in out["error"]
