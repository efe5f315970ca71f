"""Two torchrun agents on this machine as two simulated nodes (c10d rendezvous on 127.0.0.1).

deepseek_debug with dp=2, ep=2 and cluster.nodes=2: the EP group spans both "nodes", so node-limited
routing is active across them (moe.max_nodes_per_token=1: every token's experts sit on one node).
Checked: both agents exit 0; the plan reports 2 routing groups with at most 1 per token; each rank
composed its own time-stamped run directory (microseconds in the name, so they differ) and all
ranks adopted rank 0's: exactly one directory holds metrics and checkpoints, the other is removed;
metrics.jsonl has every key on every step and the loss falls. CPU only, about 20-40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpframe.train.metrics import STEP_KEYS

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_simulated_nodes_with_node_limited_routing(tmp_path):
    port = _free_port()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), OMP_NUM_THREADS="1")
    args = [
        "recipe=deepseek_debug", "parallel.dp=2", "parallel.ep=2", "cluster.nodes=2", "moe.max_nodes_per_token=1",
        "train=smoke", "train.steps=6", "train.progress=false", "checkpoint.interval=3",
        f"hydra.run.dir={tmp_path}/" + "${now:%H-%M-%S-%f}",
    ]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"hpframe-test-{port}",
        str(REPO / "launch.py"), *args,
    ]
    agents = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = [a.communicate(timeout=240)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    for a, out in zip(agents, outputs):
        assert a.returncode == 0, out[-5000:]
    log = "".join(outputs)
    assert "2 GPUs = 2 nodes x 1" in log
    assert "routing groups 2, at most 1 per token" in log

    run_dirs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs  # the other rank's own directory was given up for rank 0's
    run_dir = run_dirs[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    for r in steps:
        assert set(STEP_KEYS) <= r.keys() and all(r[k] is not None for k in STEP_KEYS)
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
