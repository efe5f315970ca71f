"""The training loop's step period (``StepClock``) and manual garbage collection (``ManualGC``)."""

from __future__ import annotations

import gc

import pytest

from hpframe.train.loop import ManualGC, StepClock


def test_step_time_is_the_period_between_step_ends():
    ticks = iter([10.0, 10.5, 11.0, 11.75, 20.0, 20.25])
    clock = StepClock(now=lambda: next(ticks))
    clock.start()
    assert clock.stop() == pytest.approx(0.5)  # first step: from its own start
    clock.start()  # 11.0: the 0.5 s of host work after the first step belongs to the second
    assert clock.stop() == pytest.approx(1.25)
    clock.reset()  # an evaluation or a checkpoint: not a training step's time
    clock.start()
    assert clock.stop() == pytest.approx(0.25)


def test_manual_gc_turns_automatic_collection_off_and_collects_every_n_steps(monkeypatch):
    assert gc.isenabled()
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    off = ManualGC(0)
    assert gc.isenabled()
    off.after_step(5)
    off.close()
    assert calls == [] and gc.isenabled()
    manual = ManualGC(3)
    try:
        assert not gc.isenabled() and len(calls) == 1  # one collection before training
        for step in range(1, 8):
            manual.after_step(step)
        assert len(calls) == 3  # after steps 3 and 6
    finally:
        manual.close()
    assert gc.isenabled()


def test_negative_gc_interval_is_refused(compose_cfg):
    from hpframe.plan import PlanError, make_plan

    cfg = compose_cfg("recipe=mixtral_debug", "train.gc_interval=-1")
    with pytest.raises(PlanError, match=r"train.gc_interval=-1 must be >= 0"):
        make_plan(cfg, 1)
