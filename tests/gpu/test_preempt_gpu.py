"""SIGTERM on CUDA, end to end through ``launch.py``: a final checkpoint, exit code 4, and a resume.

One process on one GPU, bf16 with fp32 master weights under ZeRO-1, asynchronous saves (the final save is
written in the background and committed before the process exits). After SIGTERM the run stops after its
current step k with ``latest`` naming step k, exits with code 4, and a relaunch into the same directory
resumes from step k and runs steps k+1 and k+2. The CPU suite checks the same with 2 processes
(tests/e2e/test_process_control.py). Skipped without CUDA; ~20-40 s on an H100.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
COMMON = ["recipe=mixtral_debug", "train.device=cuda", "train.dtype=bf16", "parallel.zero_stage=1", "train.progress=false",
          "train.tensorboard=false", "train.eval_interval=0", "checkpoint.async_save=true", "checkpoint.interval=100000",
          "parallel.micro_batch_size=4", "data.seq_len=64", "data.num_synthetic_tokens=100000"]


def step_numbers(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r["step"] for r in map(json.loads, filter(str.strip, lines)) if "loss" in r]


def test_sigterm_final_checkpoint_and_resume_on_cuda(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    cmd = [sys.executable, str(REPO / "launch.py"), *COMMON, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([*cmd, "train.steps=100000"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 300
        while len(step_numbers(run_dir)) < 3:
            assert proc.poll() is None and time.monotonic() < end, "no training steps"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 4, out[-4000:]
    last = step_numbers(run_dir)[-1]
    tag = f"step_{last:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag
    assert f"stopped by SIGTERM after step {last}, final checkpoint written; exit code 4" in out
    more = subprocess.run([*cmd, f"train.steps={last + 2}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / tag}: step {last}" in more.stdout
    assert step_numbers(run_dir)[-2:] == [last + 1, last + 2]
