"""The fast tier on CUDA: snapshots in host memory and the recovery from them, through ``launch.py``.

One GPU, two precision paths: bf16 with fp32 master weights under ZeRO-1 (DeepSpeed's BF16_Optimizer:
the partitions are CUDA tensors, the snapshot copies them to host memory), and bf16 master weights under
ZeRO-0 with ``train.overlap_optimizer`` (hpframe's AdamW updates block by block on a side stream beside
the next forward, so a snapshot must wait for that update and the update after it for the copies). Compared with an uninterrupted run of 2N steps
(snapshot every step, storage only at the end): a run whose process SIGKILLs itself after step N
(``train.fail_at_step``; no storage checkpoint exists yet), relaunched with ``checkpoint.resume=auto``:
it resumes from host memory (``resumed_from`` = memory in metrics.jsonl, at step N - 1 or N - 2: the
snapshot of the step before the kill may still have been in flight) and its losses equal the
uninterrupted run's bit for bit; its final checkpoint equals the uninterrupted run's tensor for tensor.
Skipped without CUDA; each launch takes ~10-20 s on an H100.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpframe.checkpoint.portable import PortableCheckpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
N = 4
COMMON = ["recipe=mixtral_debug", "train.device=cuda", f"train.steps={2 * N}", "train.progress=false",
          "train.tensorboard=false", "train.eval_interval=0", "checkpoint.keep_last=0", "parallel.micro_batch_size=4",
          "data.seq_len=64", "data.num_synthetic_tokens=100000", "train.dtype=bf16",
          "checkpoint.memory_interval=1", "checkpoint.interval=0"]
PATHS = {"zero1_fp32_master": ["parallel.zero_stage=1"],
         "zero0_bf16_master_overlap": ["parallel.zero_stage=0", "train.master_dtype=bf16", "train.overlap_optimizer=true"]}


def launch(args: list[str], run_dir: Path, *, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    cmd = [sys.executable, str(REPO / "launch.py"), *COMMON, *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("path", list(PATHS))
def test_resume_from_host_memory_after_a_kill(tmp_path: Path, path: str) -> None:
    shm = [f"checkpoint.memory_dir={tmp_path / 'shm'}", *PATHS[path]]
    launch(["checkpoint.resume=none", *shm], tmp_path / "full")
    ref = {r["step"]: r["loss"] for r in records(tmp_path / "full") if "loss" in r}
    killed = launch(["checkpoint.resume=none", *shm, f"train.fail_at_step={N}"], tmp_path / "run", ok=False)
    assert killed.returncode != 0
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").glob("step_*"))
    launch(["checkpoint.resume=auto", *shm], tmp_path / "run")
    recs = records(tmp_path / "run")
    resume = [r for r in recs if "resumed_from" in r]
    assert len(resume) == 1 and resume[0]["resumed_from"] == "memory" and resume[0]["resumed_step"] in (N - 1, N - 2), resume
    first = resume[0]["resumed_step"] + 1
    after = [r for r in recs[recs.index(resume[0]):] if "loss" in r]
    assert [r["step"] for r in after] == list(range(first, 2 * N + 1))
    assert [r["loss"] for r in after] == [ref[s] for s in range(first, 2 * N + 1)]
    final = f"step_{2 * N:08d}"
    a, b = PortableCheckpoint(tmp_path / "full" / "checkpoints" / final), PortableCheckpoint(tmp_path / "run" / "checkpoints" / final)
    assert set(a.shapes) == set(b.shapes) and a.adam_step == b.adam_step
    for kind, name in a.shapes:
        assert torch.equal(a.read(name, kind), b.read(name, kind)), (kind, name)
    assert not any((tmp_path / "shm").iterdir())  # freed when the run ended
