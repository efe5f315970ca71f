"""LR schedule values against hand-computed numbers: linear warmup, half-cosine decay to min_lr."""

from __future__ import annotations

import math

import pytest

from hpframe.train.schedule import lr_at

KW = dict(lr=1.0e-3, min_lr=1.0e-4, warmup_steps=4, total_steps=14)


def test_warmup_is_linear_and_reaches_peak():
    assert [lr_at(s, **KW) for s in range(4)] == pytest.approx([2.5e-4, 5.0e-4, 7.5e-4, 1.0e-3])


def test_cosine_decay_values():
    # steps 4..13 are 10 decay steps; step 3 + k sits at progress k / 10
    for k in range(1, 11):
        expected = 1.0e-4 + 0.5 * 9.0e-4 * (1 + math.cos(math.pi * k / 10))
        assert lr_at(3 + k, **KW) == pytest.approx(expected)
    assert lr_at(8, **KW) == pytest.approx(5.5e-4)  # halfway: mean of lr and min_lr
    assert lr_at(13, **KW) == pytest.approx(1.0e-4)  # the last step trains at min_lr
    assert lr_at(50, **KW) == pytest.approx(1.0e-4)


def test_monotone_after_warmup_and_no_warmup():
    values = [lr_at(s, **KW) for s in range(3, 14)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    no_warm = dict(KW, warmup_steps=0)
    assert lr_at(0, **no_warm) == pytest.approx(1.0e-4 + 0.5 * 9.0e-4 * (1 + math.cos(math.pi / 14)))


def test_run_shorter_than_warmup():
    kw = dict(KW, warmup_steps=10, total_steps=5)
    assert [lr_at(s, **kw) for s in range(5)] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4, 5e-4])
