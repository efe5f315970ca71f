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
