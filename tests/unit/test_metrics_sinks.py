"""Metrics sinks besides metrics.jsonl: Weights & Biases in offline mode (no network; the run's files
appear under RUN_DIR/wandb and hold the logged values), the one-line error naming train.wandb when the
library is missing, each expert's load share in step lines, and ``python -m hpframe.plot`` drawing
PNG files from a generated metrics.jsonl (matplotlib's Agg backend)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpframe.errors import UserError
from hpframe.train.metrics import MetricsWriter, expert_shares, read_metrics

REPO = Path(__file__).resolve().parents[2]


def _records(steps: int = 12, experts: int = 4) -> list[dict]:
    out = []
    for step in range(1, steps + 1):
        load = [1.0 + 0.5 * math.sin(step + e) for e in range(experts)]
        out.append({"step": step, "loss": 7.0 - 0.3 * step, "lm_loss": 6.9 - 0.3 * step, "aux_loss": 0.04, "lr": 3e-4 * step / steps,
                    "grad_norm": 1.0, "tokens_per_s": 5000.0 + 10 * step, "mfu": 0.2, "expert_load_cv": 0.3, "dropped_token_frac": 0.0,
                    "ep_load_imbalance": 1.1, "skipped": False, "consumed_tokens": 1024 * step, "step_time_s": 0.2,
                    "expert_load": [x / sum(load) for x in load]})
    return out


def test_expert_shares() -> None:
    stats = {"layer0/tokens_per_expert": [1, 3, 0, 4], "layer1/tokens_per_expert": [3, 1, 4, 0], "max_load_cv": 0.5}
    assert expert_shares(stats) == [0.25, 0.25, 0.25, 0.25]
    assert expert_shares({"layer0/tokens_per_expert": [2, 6]}) == [0.25, 0.75]
    assert expert_shares(None) == []


WANDB_WRITER = """
import json, sys
from pathlib import Path
from hpframe.train.metrics import MetricsWriter
run_dir = Path(sys.argv[1])
writer = MetricsWriter(run_dir, tensorboard=False, wandb=dict(project="hpframe-test", mode="offline", config={"lr": 3e-4}, name="t"))
for line in sys.stdin:
    writer.write(json.loads(line))
writer.close()
"""


@pytest.mark.slow  # wandb's service process takes ~10 s to start and finish
def test_wandb_offline_run(tmp_path: Path) -> None:
    """In a separate process: wandb's service writes the run file completely by the time the process exits."""
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    records = "".join(json.dumps(r) + "\n" for r in _records(3))
    out = subprocess.run([sys.executable, "-c", WANDB_WRITER, str(tmp_path)], input=records, env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()
    assert data.count(b"train/loss") >= 3 and data.count(b"train/tokens_per_s") >= 3  # one history record per step
    assert len(read_metrics(tmp_path)) == 3  # metrics.jsonl written as well


def test_wandb_missing_library_names_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as on a machine without it
    with pytest.raises(UserError, match=r"train.wandb=true needs the Weights & Biases library: pip install wandb") as info:
        MetricsWriter(tmp_path, tensorboard=False, wandb=dict(project="p", mode="offline", config={}, name="t"))
    assert info.value.key == "train.wandb"
    with pytest.raises(UserError, match=r"train.wandb_mode='cloud' must be online or offline"):
        MetricsWriter(tmp_path, tensorboard=False, wandb=dict(project="p", mode="cloud", config={}, name="t"))


def test_plot_command(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in _records()] + [json.dumps({"step": 6, "eval_loss": 5.5}), json.dumps({"step": 12, "eval_loss": 4.0})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "hpframe.plot", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = {"loss.png", "lr.png", "throughput.png", "expert_load.png"}
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == names
    for name in names:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert all(str(tmp_path / "plots" / n) in out.stdout for n in names)
    empty = subprocess.run([sys.executable, "-m", "hpframe.plot", str(tmp_path / "nowhere")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2 and "no metrics.jsonl" in empty.stderr
