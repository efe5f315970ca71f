"""The planner is pure: importing hpframe.plan and making and rendering a plan, in a fresh interpreter,
loads neither torch nor deepspeed; the package source never reads the environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import hpframe.plan

PROBE = """
import json, sys
from hydra import compose, initialize_config_dir
from hpframe.config.store import CONF_DIR, register_configs
from hpframe.config.convert import to_run_config
import hpframe.plan
from hpframe.plan import make_plan
from hpframe.plan.report import render_json, render_table
register_configs()
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = to_run_config(compose(config_name="config", overrides=["recipe=deepseek_v3"]))
plan = make_plan(cfg)
render_table(plan, cfg); render_json(plan, cfg)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "deepspeed", "numpy"))))
"""


def test_plan_imports_no_torch_or_deepspeed() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_plan_source_reads_no_environment() -> None:
    for path in Path(hpframe.plan.__file__).parent.glob("*.py"):
        text = path.read_text()
        for word in ("os.environ", "getenv", "import torch", "import deepspeed", "subprocess"):
            assert word not in text, f"{path.name} uses {word}"
