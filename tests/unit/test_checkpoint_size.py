"""The planner's checkpoint figures against what hpframe does.

Compared: ``make_plan(cfg).checkpoint.bytes`` with the bytes of the tensor files of a real checkpoint
written by ``launch.py`` (one step, CPU) for the Mixtral and DeepSeek debug recipes, within 2 %
(the difference is safetensors headers and the router-bias buffers); and the loop's save interval
with ``checkpoint.interval=0`` with the planner's Young/Daly ``interval_steps`` (an explicit interval
wins; a disabled checkpoint means no periodic saves).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpframe.checkpoint.portable import checkpoint_bytes
from hpframe.plan import make_plan
from hpframe.train.loop import checkpoint_interval

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["mixtral_debug", "deepseek_debug"])
def test_planner_size_matches_written_checkpoint(recipe, tmp_path, compose_cfg):
    args = [f"recipe={recipe}", "train=smoke", "train.steps=1", "data.seq_len=32", "parallel.micro_batch_size=2",
            "data.num_synthetic_tokens=50000", "train.progress=false", "train.tensorboard=false", "checkpoint.resume=none"]
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    proc = subprocess.run([sys.executable, str(REPO / "launch.py"), *args, f"hydra.run.dir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = checkpoint_bytes(tmp_path / "checkpoints" / "step_00000001")
    planned = make_plan(compose_cfg(*args)).checkpoint.bytes
    assert written == pytest.approx(planned, rel=0.02), (written, planned)


def test_default_interval_is_the_planners(compose_cfg):
    cfg = compose_cfg("recipe=mixtral_debug", "checkpoint.interval=0")
    plan = make_plan(cfg)
    assert plan.checkpoint.interval_steps >= 1
    assert checkpoint_interval(cfg, plan) == plan.checkpoint.interval_steps
    explicit = compose_cfg("recipe=mixtral_debug", "checkpoint.interval=7")
    assert checkpoint_interval(explicit, make_plan(explicit)) == 7


def test_save_timeout_is_derived_from_the_planned_write_time(compose_cfg):
    """checkpoint.save_timeout_s=0: max(60 s, 10 x the planned write time); an explicit value wins; a
    negative or infinite one is refused naming the key."""
    from hpframe.plan import PlanError

    small = make_plan(compose_cfg("recipe=mixtral_debug"))
    assert small.checkpoint.save_timeout_seconds == 60.0  # a debug model writes in milliseconds: the floor
    slow = make_plan(compose_cfg("recipe=mixtral_debug", "cluster.storage_bw_GBps=1e-6"))
    assert slow.checkpoint.save_timeout_seconds == pytest.approx(10 * slow.checkpoint.write_seconds)
    assert slow.checkpoint.save_timeout_seconds > 60
    assert make_plan(compose_cfg("recipe=mixtral_debug", "checkpoint.save_timeout_s=5")).checkpoint.save_timeout_seconds == 5.0
    for bad in ("-1.0", "inf"):
        with pytest.raises(PlanError, match=rf"checkpoint.save_timeout_s={bad} must be a finite number") as err:
            make_plan(compose_cfg("recipe=mixtral_debug", f"checkpoint.save_timeout_s={bad}"))
        assert err.value.key == "checkpoint.save_timeout_s"
