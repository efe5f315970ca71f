"""train.profile_from_step: StepProfiler traces exactly the asked steps and writes its three files (CPU)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from hpframe.train.profile import StepProfiler, phase


def _steps(prof: StepProfiler, n: int) -> list[int]:
    """Run n steps; returns the steps after which the profiler wrote its files."""
    x = torch.randn(64, 64)
    wrote = []
    for step in range(1, n + 1):
        prof.before_step(step)
        with phase("forward"):
            y = x @ x
        with phase("optimizer"):
            y.add_(1.0)
        if prof.after_step(step):
            wrote.append(step)
    return wrote


def test_profiles_the_asked_steps(tmp_path) -> None:
    prof = StepProfiler(tmp_path, first=2, count=3, rank=0, cuda=False)
    assert _steps(prof, 6) == [4]  # the loop keeps the writing out of step 5's time
    names = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert names == ["rank0_ops.txt", "rank0_phases.txt", "rank0_trace.json.gz"]
    phases = (tmp_path / "profile" / "rank0_phases.txt").read_text()
    assert "steps 2-4 (3 steps)" in phases
    rows = {line.split()[0]: line.split() for line in phases.splitlines() if line.startswith("hpframe/")}
    # three profiled steps with one call each: 1.0 call per step (steps 1, 5 and 6 are outside)
    assert rows["hpframe/forward"][1] == "1.0" and rows["hpframe/optimizer"][1] == "1.0"
    assert "aten::mm" in (tmp_path / "profile" / "rank0_ops.txt").read_text()
    trace = json.loads(gzip.decompress((tmp_path / "profile" / "rank0_trace.json.gz").read_bytes()))
    mm = [e for e in trace["traceEvents"] if e.get("name") == "aten::mm"]
    assert len(mm) == 3


def test_off_and_early_end(tmp_path) -> None:
    off = StepProfiler(tmp_path / "off", first=0, count=3, rank=0, cuda=False)
    _steps(off, 4)
    assert not (tmp_path / "off" / "profile").exists()
    early = StepProfiler(tmp_path / "early", first=3, count=5, rank=1, cuda=False)
    _steps(early, 4)  # the run ends inside the profiled range
    early.close()
    assert not (tmp_path / "early" / "profile").exists()


def test_bad_values_name_the_key(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"train.profile_from_step=-1 must be >= 0"):
        StepProfiler(tmp_path, first=-1, count=3, rank=0, cuda=False)
    with pytest.raises(ValueError, match=r"train.profile_num_steps=0 must be >= 1"):
        StepProfiler(tmp_path, first=2, count=0, rank=0, cuda=False)


def test_with_stack_puts_python_callers_in_the_trace(tmp_path) -> None:
    prof = StepProfiler(tmp_path, first=1, count=1, rank=0, cuda=False, with_stack=True)
    _steps(prof, 1)
    trace = json.loads(gzip.decompress((tmp_path / "profile" / "rank0_trace.json.gz").read_bytes()))
    callers = [e["name"] for e in trace["traceEvents"] if e.get("cat") == "python_function"]
    assert any("test_profile.py" in name and "_steps" in name for name in callers), callers[:10]
