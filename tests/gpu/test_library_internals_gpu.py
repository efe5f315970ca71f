"""hpframe's patched bf16 path against DeepSpeed's own on one GPU, where the patches' GPU-only part runs.

On CUDA with Triton, hpframe's AdamW kernel writes the bf16 copy of each fp32 master partition in its
own pass, and the replaced ``BF16_Optimizer.update_lp_params`` then copies only what the kernel did
not write (hpframe/engine/bf16_grads.py, ``_fuse_lp_copy``); the CPU test
(tests/dist/test_library_internals.py) cannot reach that path. One process (NCCL, world size 1),
mixtral_debug in bf16 with fp32 master weights under ZeRO 1 (BF16_Optimizer), no clipping, hpframe's
``build_engine`` against ``deepspeed.initialize`` with torch's fused AdamW on the same initial weights
and batches (DeepSpeed with fp32 communication: at dp = 1 hpframe skips the all-reduce that DeepSpeed's
bf16 default would round the gradients for):

  * the fused path ran (the kernel was chosen and wrote every partition's bf16 copy), and after each
    step checked each bf16 partition equals its fp32 master partition rounded to bf16, bit for bit;
  * one step from equal weights and gradients: the fp32 master weights within 1e-3 lr of DeepSpeed's
    (the two AdamW implementations differ only in the last fp32 bits), the bf16 weights equal to
    DeepSpeed's in all but 0.1% of the entries;
  * three steps: losses and norms within 1e-3 relative. The weights are not compared after three
    steps: a last-bit difference that flips a bf16 weight changes the next gradients at bf16
    precision, and Adam turns that into differences of order lr wherever a gradient is small
    (measured on an H100: 2.6 lr at most, 58% of the entries more than 1e-3 lr apart; rounding the
    gradients to bf16 on the CPU gives the same 2.6 lr);
  * with the kernel off (``HPFRAME_TRITON_ADAMW=0``: torch's fused AdamW inside the same patched
    BF16_Optimizer, whose ``update_lp_params`` then copies every partition) the fp32 master weights
    after three steps equal DeepSpeed's bit for bit.
Skipped without CUDA.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_fixtures import one_gpu_process_group  # noqa: E402,F401  (a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _bf16_matches_master(ds) -> bool:
    opt = ds.optimizer
    return all(torch.equal(parts[0], fp32.to(torch.bfloat16))
               for parts, fp32 in zip(opt.bf16_partitioned_groups, opt.fp32_groups_flat_partition))


def _apart(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], lr: float) -> tuple[float, float]:
    """(largest difference in lr, fraction of entries more than 1e-3 lr apart)."""
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in ours) / lr
    off = sum(int(((ours[n] - theirs[n]).abs() > 1e-3 * lr).sum()) for n in ours)
    return worst, off / sum(t.numel() for t in ours.values())


def test_fused_bf16_copy_and_update_equal_deepspeeds_own(one_gpu_process_group, monkeypatch) -> None:
    from conftest import compose_run_config
    from engine_cases import build_rank_engine, rank_batches
    from test_library_internals import BASE, STEPS, _deepspeed_own, _master_weights

    from hpframe.engine import adamw_kernel

    if not adamw_kernel.kernel_ok([torch.zeros(1, device="cuda")]):
        pytest.skip("hpframe's Triton AdamW is off here (no Triton, or HPFRAME_TRITON_ADAMW=0)")

    cfg = compose_run_config(*BASE, "parallel.dp=1", "parallel.zero_stage=1", "train.dtype=bf16",
                             "train.grad_clip=0", "train.device=cuda")
    lr = cfg.train.lr
    engine, plan, groups = build_rank_engine(cfg)
    opt = engine.ds.optimizer
    assert type(opt).__name__ == "BF16_Optimizer" and "update_lp_params" in vars(opt)
    rows = [engine.train_step(rank_batches(cfg, plan, 0, 0))]
    inner = opt.optimizer
    assert inner._kernel is True  # hpframe's Triton AdamW ran, so the fused copy was taken
    assert len(inner.lp_copies) == len(opt.fp32_groups_flat_partition)
    assert _bf16_matches_master(engine.ds)
    ours_1 = _master_weights(engine.ds)
    for step in range(1, STEPS):
        rows.append(engine.train_step(rank_batches(cfg, plan, 0, step)))
        assert _bf16_matches_master(engine.ds), step

    _, _, theirs_1, ds_opt = _deepspeed_own(cfg, plan, groups, 0, fp32_communication=True, steps=1)
    assert ds_opt == "BF16_Optimizer"
    worst, off = _apart(ours_1, theirs_1, lr)
    assert worst < 1e-3, (worst, off)
    flipped = sum(int((ours_1[n].to(torch.bfloat16) != theirs_1[n].to(torch.bfloat16)).sum()) for n in ours_1)
    assert flipped / sum(t.numel() for t in ours_1.values()) < 1e-3, flipped

    losses, norms, theirs, _ = _deepspeed_own(cfg, plan, groups, 0, fp32_communication=True)
    assert [r.loss for r in rows] == pytest.approx(losses, rel=1e-3)
    assert [r.grad_norm for r in rows] == pytest.approx(norms, rel=1e-3)

    monkeypatch.setenv("HPFRAME_TRITON_ADAMW", "0")
    engine, plan, groups = build_rank_engine(cfg, groups)
    for step in range(STEPS):
        engine.train_step(rank_batches(cfg, plan, 0, step))
    assert engine.ds.optimizer.optimizer._kernel is False and _bf16_matches_master(engine.ds)
    unfused = _master_weights(engine.ds)
    assert all(torch.equal(unfused[n], theirs[n]) for n in theirs), _apart(unfused, theirs, lr)
