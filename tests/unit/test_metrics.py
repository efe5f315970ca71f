"""Metrics arithmetic against hand computation: MFU, expert-load CV, MoE summaries, and the jsonl writer."""

from __future__ import annotations

import math

import pytest
import torch

from hpframe.train.metrics import (
    MetricsWriter,
    ep_load_imbalance,
    load_cv,
    mfu,
    read_metrics,
    summarize_ep_imbalance,
    summarize_moe,
)


def test_mfu_formula():
    # 10,000 tok/s x 6e9 FLOP/token = 6e13 FLOP/s over 8 x 989e12 peak
    assert mfu(10_000, 6e9, 8, 989.0) == pytest.approx(6e13 / (8 * 989e12))
    assert mfu(1000.0, 2e6, 1, 0.2) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="peak_tflops"):
        mfu(1.0, 1.0, 1, 0.0)


def test_load_cv():
    assert load_cv(torch.tensor([5, 5, 5, 5])) == 0.0
    # counts 0, 2: mean 1, population std 1
    assert load_cv(torch.tensor([0, 2])) == pytest.approx(1.0)
    assert load_cv(torch.tensor([1.0, 2.0, 3.0, 6.0])) == pytest.approx(math.sqrt(3.5) / 3.0)
    assert load_cv(torch.zeros(4)) == 0.0


def test_summarize_moe_shapes():
    assert summarize_moe(None) == (0.0, 0.0) and summarize_moe({}) == (0.0, 0.0) and summarize_moe([]) == (0.0, 0.0)
    layers = [
        {"tokens_per_expert": torch.tensor([0, 2]), "dropped_frac": torch.tensor(0.1)},
        {"tokens_per_expert": torch.tensor([3, 3]), "dropped_frac": 0.3},
    ]
    assert summarize_moe(layers) == pytest.approx((0.5, 0.2))
    assert summarize_moe({"layer1": layers[0], "layer3": layers[1]}) == pytest.approx((0.5, 0.2))
    assert summarize_moe({"load_cv": 0.25, "dropped_frac": 0.0}) == pytest.approx((0.25, 0.0))


def test_writer_jsonl_and_tensorboard(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)
    w.write({"step": 1, "loss": 2.5, "skipped": False})
    w.write({"step": 2, "loss": float("nan"), "skipped": True})
    w.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5, "skipped": False}, {"step": 2, "loss": None, "skipped": True}]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    off = MetricsWriter(tmp_path / "other", enabled=False)
    off.write({"step": 1, "loss": 1.0})
    off.close()
    assert not (tmp_path / "other").exists()


def test_ep_load_imbalance():
    # experts 0-1 on EP rank 0, 2-3 on rank 1
    assert ep_load_imbalance([4, 0, 2, 2], 2) == 1.0  # uneven experts, even ranks
    assert ep_load_imbalance([6, 2, 1, 1], 2) == pytest.approx(8 / 5)
    assert ep_load_imbalance([6, 2, 1, 1], 4) == pytest.approx(6 / 2.5)
    assert ep_load_imbalance([6, 2, 1, 1], 1) == 1.0 and ep_load_imbalance([0, 0], 2) == 1.0
    stats = {"layer1/tokens_per_expert": [6, 2, 1, 1], "layer1/load_cv": 0.7, "layer3/tokens_per_expert": [1, 1, 1, 1]}
    assert summarize_ep_imbalance(stats, 2) == pytest.approx((1.6 + 1.0) / 2)
    assert summarize_ep_imbalance(None, 2) == 1.0
