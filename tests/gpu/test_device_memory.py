"""The plan's memory estimate against the real GPU: ``launch.py`` refuses, before building anything, a
plan that needs more than the card's free memory even when cluster.gpu_memory_gb claims it fits
(mixtral_h200 with 48 layers: about 4 x the 12-layer 87.9 GiB), naming both numbers and the keys that
would fit; with plan.memory_check=false the run goes on and the CUDA out-of-memory error that follows
is reported in one paragraph (estimate, measured peak, keys) with exit code 2, no raw traceback.
Skipped without a CUDA device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REPO = Path(__file__).resolve().parents[2]
TOO_BIG = ["recipe=mixtral_h200", "model.num_layers=48", "cluster.gpu_memory_gb=10000", "train.compile=false",
           "train.steps=2", "train.progress=false", "checkpoint.enabled=false"]


def _launch(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    return subprocess.run([sys.executable, "launch.py", *args, f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_plan_larger_than_the_card_is_refused_before_building(tmp_path: Path) -> None:
    _, total = torch.cuda.mem_get_info()
    out = _launch(TOO_BIG, tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-4000:]
    assert "the plan needs 343.3 GiB per GPU" in text and f"free of {total / 2**30:.1f} GiB" in text
    # an 80 GB card fits no layout of one GPU; a 141 GB card fits bf16 master weights with recompute
    assert "settings that fit: train.master_dtype=bf16" in text or "no layout of this world size fits" in text
    assert "cluster.gpu_memory_gb=10000 assumes more" in text
    assert "INFO model:" not in text and "Traceback" not in text  # refused before the model was built


def test_real_out_of_memory_is_one_paragraph(tmp_path: Path) -> None:
    out = _launch([*TOO_BIG, "plan.memory_check=false"], tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-4000:]
    lines = [line for line in text.splitlines() if "hpframe: out of GPU memory on cuda:" in line]
    assert len(lines) == 1 and "the plan estimated" in lines[0] and "the measured peak before the failure was" in lines[0]
    assert "Traceback" not in text and list(tmp_path.glob("error_rank0.txt"))
