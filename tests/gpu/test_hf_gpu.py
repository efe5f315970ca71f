"""model.from_hf on one CUDA GPU: tiny transformers checkpoints (Mixtral, DeepSeek-V3 with YaRN, Qwen3-MoE;
``hpframe.testing.hf_models``) read into hpframe's model on the GPU give transformers' logits computed on
the same GPU (fp32, TF32 off; hpframe's MoE runs its CUDA path), and ``launch.py model.from_hf=DIR``
trains from them in bf16: the first step's loss equals the cross-entropy transformers gives the same
first batch (fp32 on the GPU; within 3%, the bf16 rounding), the losses stay finite and fall.
Skipped without CUDA.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def no_tf32():  # noqa: ANN201
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen3_moe"])
def test_logits_on_gpu_equal_transformers_on_gpu(family: str, tmp_path: Path) -> None:
    from conftest import compose_run_config

    from hpframe.config.hf_config import expand_overrides
    from hpframe.testing.hf_models import load_single_device, sample_tokens, write_checkpoint

    theirs = write_checkpoint(family, tmp_path).cuda()
    cfg = compose_run_config(*expand_overrides([f"model.from_hf={tmp_path}"]))
    ours = load_single_device(tmp_path, cfg.model, cfg.moe, device="cuda")
    tokens = sample_tokens(101, batch=4, seq=48).cuda()
    with torch.no_grad():
        a, b = ours.eval()(tokens), theirs(tokens).logits
    assert (a - b).abs().max().item() < 1e-4, (a - b).abs().max().item()


def first_batch_loss(model: torch.nn.Module, overrides: list[str]) -> float:
    """transformers' mean cross-entropy over the micro-batches of the run's first step (rank 0)."""
    import torch.nn.functional as F
    from conftest import compose_run_config

    from hpframe.config.hf_config import expand_overrides
    from hpframe.data import build_data
    from hpframe.plan import make_plan

    cfg = compose_run_config(*expand_overrides(overrides))
    batches = build_data(cfg, make_plan(cfg), 0).train.next_step()
    with torch.no_grad():
        losses = [F.cross_entropy(model(b[:, :-1].cuda()).logits.flatten(0, 1).float(), b[:, 1:].cuda().flatten())
                  for b in batches]
    return float(torch.stack(losses).mean())


def test_launch_trains_from_hf_on_gpu(tmp_path: Path) -> None:
    from hpframe.testing.hf_models import write_checkpoint

    theirs = write_checkpoint("qwen3_moe", tmp_path / "src").cuda()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    overrides = [f"model.from_hf={tmp_path / 'src'}", "train=smoke", "train.steps=8", "train.device=cuda",
                 "train.dtype=bf16", "parallel.zero_stage=1", "data.seq_len=64", "parallel.micro_batch_size=8",
                 "data.num_synthetic_tokens=100000",
                 "train.progress=false", "train.tensorboard=false", "checkpoint.resume=none", "checkpoint.enabled=false",
                 "moe.aux_loss_coef=0"]
    cmd = [sys.executable, str(REPO / "launch.py"), *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    ref = first_batch_loss(theirs, overrides)
    assert abs(losses[0] - ref) < 0.03 * ref, (losses[0], ref)
