"""The dry run: hpframe.run.main with plan.dry_run=true prints the plan (JSON keys as documented in
docs/planner.md, or tables) and starts nothing; launch.py exits 0 with one JSON document, and 2 with a
one-line message (no traceback) on an impossible configuration. Two subprocess tests; the rest in-process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpframe.run import main

REPO = Path(__file__).resolve().parents[1]
TOP_KEYS = {"world_size", "degrees", "params", "flops_per_token", "memory_per_gpu_bytes", "pipeline", "experts",
            "comm_bytes_per_step", "checkpoint", "batch", "time", "warnings", "moe_layers"}


@pytest.mark.parametrize("recipe", ["deepseek_v3", "mixtral_debug", "gpt_debug"])
def test_json_has_documented_keys(compose_cfg, capsys: pytest.CaptureFixture[str], recipe: str) -> None:
    cfg = compose_cfg(f"recipe={recipe}", "plan.dry_run=true", "plan.format=json")
    assert main(cfg) == 0
    doc = json.loads(capsys.readouterr().out)
    assert TOP_KEYS <= doc.keys()
    assert set(doc["degrees"]) >= {"tp", "pp", "dp", "ep", "zero_stage"}
    assert set(doc["params"]) >= {"total", "active", "components"}
    assert set(doc["memory_per_gpu_bytes"]) >= {"weights", "gradients", "optimizer", "activations", "total"}
    assert doc["memory_per_gpu_bytes"]["total"] == sum(doc["memory_per_gpu_bytes"][k] for k in ("weights", "gradients", "optimizer", "activations"))
    assert set(doc["comm_bytes_per_step"]) >= {"moe_all_to_all", "tp", "dp", "pp", "total", "moe_move_experts"}
    assert set(doc["checkpoint"]) >= {"bytes", "write_seconds", "interval_seconds", "interval_steps"}
    layers = [i for s in doc["pipeline"]["stages"] for i in s["layers"]]
    assert layers == list(range(cfg.model.num_layers))
    if cfg.moe.num_experts:
        placement = doc["experts"]["placement"]
        assert len(placement) == doc["degrees"]["ep"]
        assert placement[-1]["experts"][1] == cfg.moe.num_experts - 1
    else:
        assert doc["experts"] is None


def test_deepseek_v3_json_values(compose_cfg, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(compose_cfg("recipe=deepseek_v3", "plan.dry_run=true", "plan.format=json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["world_size"] == 2048
    assert doc["degrees"] == {"tp": 1, "pp": 16, "dp": 128, "ep": 64, "edp": 2, "zero_stage": 1}
    assert doc["params"]["total"] == 671_026_404_352
    assert doc["experts"]["routing_groups"] == 8 and doc["experts"]["max_groups_per_token"] == 4
    assert doc["memory_per_gpu_bytes"]["total"] <= doc["memory_per_gpu_bytes"]["device"]


def test_table_output(compose_cfg, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(compose_cfg("recipe=mixtral_8x7b", "plan.dry_run=true")) == 0
    out = capsys.readouterr().out
    for fragment in ("mixtral_8x7b on h200x64: 64 GPUs", "46,702,792,704", "Pipeline stages", "Memory per GPU",
                     "Expert placement", "Communication per GPU per step", "checkpoint interval (Young/Daly)"):
        assert fragment in out


def test_invalid_config_in_process(compose_cfg, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(compose_cfg("recipe=mixtral_debug", "parallel.tp=3", "plan.dry_run=true")) == 2
    err = capsys.readouterr().err
    assert "parallel.tp=3" in err and "model.num_heads=4" in err


def test_launch_json_subprocess() -> None:
    out = subprocess.run([sys.executable, "launch.py", "recipe=deepseek_v3", "plan.dry_run=true", "plan.format=json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["world_size"] == 2048 and TOP_KEYS <= doc.keys()


def test_launch_invalid_exits_2_without_traceback() -> None:
    out = subprocess.run([sys.executable, "launch.py", "recipe=mixtral_debug", "parallel.dp=3", "parallel.ep=3", "plan.dry_run=true"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "moe.num_experts=8" in lines[0] and "parallel.ep=3" in lines[0]
