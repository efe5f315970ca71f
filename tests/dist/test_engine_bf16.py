"""bf16 through the engine on CPU: DeepSpeed's BF16_Optimizer (ZeRO 1) and ZeRO-2 bf16 agree.

Two processes, mixtral_debug with dp2 = ep2, train.dtype=bf16, three steps on the same global batches:
the ZeRO-1 run (DeepSpeed picks BF16_Optimizer, whose fp32 gradients the engine's norm/clip guard
reads) and the ZeRO-2 run (DeepSpeedZeroOptimizer) give the same losses and global grad norms, and
both stay within bf16 rounding (2%) of the fp32 run. A guard that read no gradients would report a
zero norm; one that read the wrong ones would disagree between the two optimizers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hpframe.testing.distributed import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _worker(rank: int, world: int, runs: list[tuple[int, str, str]]) -> dict:
    from conftest import compose_run_config
    from engine_cases import build_rank_engine, rank_batches

    out = {}
    groups = None  # one set of process groups for every run (same layout; DeepSpeed registers them once)
    for zero, dtype, master in runs:
        cfg = compose_run_config("recipe=mixtral_debug", "parallel.dp=2", "parallel.ep=2", f"parallel.zero_stage={zero}",
                                 f"train.dtype={dtype}", f"train.master_dtype={master}", "parallel.micro_batch_size=2", "parallel.grad_accum=2",
                                 "data.seq_len=16", "train.grad_clip=0.5")
        engine, plan, groups = build_rank_engine(cfg, groups)
        rows = []
        for step in range(3):
            res = engine.train_step(rank_batches(cfg, plan, rank, step))
            rows.append((res.loss, res.grad_norm, res.skipped))
        opt = engine.ds.optimizer
        inner = getattr(opt, "optimizer", opt)  # DeepSpeed wrappers hold the client AdamW
        moments = {str(v.dtype) for st in inner.state.values() for k, v in st.items() if k == "exp_avg"}
        # hpframe's single-kernel gradient hand-over replaces BF16_Optimizer's method (a plain function)
        patched = "update_hp_grads" in vars(opt)
        out[(zero, dtype, master)] = {"optimizer": type(opt).__name__, "rows": rows, "moments": moments,
                                      "patched": patched,
                                      "param_dtypes": {str(p.dtype) for p in engine.module.parameters()}}
    return out


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_bf16_optimizers_agree_and_track_fp32() -> None:
    z1, z2, fp32, pure = (1, "bf16", "fp32"), (2, "bf16", "fp32"), (1, "fp32", "fp32"), (1, "bf16", "bf16")
    plain = (0, "bf16", "bf16")
    results = run_distributed(_worker, 2, ([z1, z2, fp32, pure, plain],), timeout=280)
    r = results[0]
    assert r[z1]["optimizer"] == "BF16_Optimizer"
    assert r[z2]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert r[pure]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert r[z1]["patched"] and not r[z2]["patched"]
    assert r[plain]["optimizer"] == "SkippableAdamW"  # no DeepSpeed precision wrapper
    assert r[z1]["moments"] == {"torch.float32"} and r[pure]["moments"] == r[plain]["moments"] == {"torch.bfloat16"}
    assert r[plain]["param_dtypes"] == {"torch.bfloat16"}
    for (l1, n1, s1), (l2, n2, s2), (lf, nf, sf), (lp, np_, sp) in zip(*(r[k]["rows"] for k in (z1, z2, fp32, pure))):
        assert not (s1 or s2 or sf or sp)
        assert n1 > 0.5  # the clip (0.5) is active, so the runs follow the same clipped path
        assert l1 == pytest.approx(l2, rel=1e-3) and n1 == pytest.approx(n2, rel=1e-3)
        assert l1 == pytest.approx(lf, rel=2e-2) and n1 == pytest.approx(nf, rel=2e-2)
        assert lp == pytest.approx(lf, rel=2e-2) and np_ == pytest.approx(nf, rel=2e-2)
    for (lp, np_, sp), (lq, nq, sq), (lf, nf, _) in zip(*(r[k]["rows"] for k in (plain, pure, fp32))):
        assert not sq and lq == pytest.approx(lf, rel=2e-2) and nq == pytest.approx(nf, rel=2e-2)
        # the two pure-bf16 paths (ZeRO 0 plain update, ZeRO 1 DeepSpeed) apply the same bf16 AdamW
        assert lq == pytest.approx(lp, rel=2e-3) and nq == pytest.approx(np_, rel=2e-2)
    # first step: same weights, so the pure-bf16 runs' losses are the BF16_Optimizer run's
    assert r[pure]["rows"][0][0] == pytest.approx(r[z1]["rows"][0][0], rel=1e-3)
    assert r[plain]["rows"][0][0] == pytest.approx(r[z1]["rows"][0][0], rel=1e-3)
    assert results[1] == results[0]  # every rank reports the same global numbers
