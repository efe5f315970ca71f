"""Save and resume on CUDA, end to end through ``launch.py``, on every precision path.

What the CPU suite checks for resume (tests/dist/test_resume.py, tests/e2e) runs here on one GPU:
per precision path (fp32 under ZeRO-1, bf16 with fp32 master weights under ZeRO-1 = DeepSpeed's
BF16_Optimizer, bf16 master weights under ZeRO-0 = hpframe's plain bf16 update), a run of 2N steps
that saves at step N, and a second run resumed from that step-N checkpoint into another directory.
Compared: the resumed run's per-step losses with the uninterrupted run's steps N+1..2N, and both final
checkpoints tensor by tensor (weights, both Adam moments, the Adam step). Also: an asynchronous save
resumed the same way, a checkpoint written under ZeRO-1 resumed under ZeRO-2 and ZeRO-0, and the export
of a GPU-trained checkpoint loaded by transformers with logits equal to hpframe's.

Every comparison with the uninterrupted run is bit for bit where the two runs execute the same kernels
on the same values (same ZeRO stage); across ZeRO stages the gradient norm is summed in another order,
so the losses are compared to 1e-5 relative (dropping the Adam moments at the resume moves the
losses of the following steps by more than 1e-3).
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
N = 4  # save at step N, train to 2N
COMMON = ["recipe=mixtral_debug", "train.device=cuda", f"train.steps={2 * N}", "train.progress=false",
          "train.tensorboard=false", "train.eval_interval=0", "checkpoint.keep_last=0", "parallel.micro_batch_size=4",
          "data.seq_len=64", "data.num_synthetic_tokens=100000"]
PATHS = {
    "fp32_zero1": ["train.dtype=fp32", "parallel.zero_stage=1"],
    "bf16_fp32master_zero1": ["train.dtype=bf16", "parallel.zero_stage=1"],
    "bf16_bf16master_zero0": ["train.dtype=bf16", "train.master_dtype=bf16", "parallel.zero_stage=0"],
}


def launch(args: list[str], run_dir: Path) -> list[dict]:
    """Run launch.py into ``run_dir``; return its step records (asserting exit 0)."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    cmd = [sys.executable, str(REPO / "launch.py"), *COMMON, *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in lines if "loss" in r]


def uninterrupted(tmp_path: Path, name: str, args: list[str]) -> tuple[Path, list[float]]:
    run = tmp_path / name / "full"
    steps = launch([*args, f"checkpoint.interval={N}", "checkpoint.resume=none"], run)
    assert [r["step"] for r in steps] == list(range(1, 2 * N + 1))
    return run, [r["loss"] for r in steps]


def resumed(run: Path, out: Path, args: list[str]) -> list[float]:
    steps = launch([*args, "checkpoint.interval=0", f"checkpoint.resume={run / 'checkpoints' / f'step_{N:08d}'}",
                    "train.seed=999"], out)  # another init seed: every weight must come from the checkpoint
    assert [r["step"] for r in steps] == list(range(N + 1, 2 * N + 1))
    return [r["loss"] for r in steps]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ca, cb = PortableCheckpoint(a), PortableCheckpoint(b)
    assert set(ca.shapes) == set(cb.shapes) and ca.adam_step == cb.adam_step and ca.adam_step
    for kind, name in ca.shapes:
        x, y = ca.read(name, kind), cb.read(name, kind)
        assert torch.equal(x, y), f"{kind} {name}: max diff {(x - y).abs().max().item()}"


@pytest.mark.parametrize("path", sorted(PATHS))
def test_exact_resume_on_each_precision_path(path: str, tmp_path: Path) -> None:
    args = PATHS[path]
    run, ref = uninterrupted(tmp_path, path, args)
    res = resumed(run, tmp_path / path / "resumed", args)
    assert res == ref[N:], f"{path}: resumed {res} != uninterrupted {ref[N:]}"
    final = f"step_{2 * N:08d}"
    assert_same_checkpoint(run / "checkpoints" / final, tmp_path / path / "resumed" / "checkpoints" / final)


def test_async_save_resumes_exactly(tmp_path: Path) -> None:
    args = [*PATHS["bf16_fp32master_zero1"], "checkpoint.async_save=true"]
    run, ref = uninterrupted(tmp_path, "async", args)
    assert resumed(run, tmp_path / "async" / "resumed", args) == ref[N:]


def test_resume_at_another_zero_stage(tmp_path: Path) -> None:
    run, ref = uninterrupted(tmp_path, "z1", PATHS["fp32_zero1"])
    for stage in (2, 0):
        res = resumed(run, tmp_path / f"z{stage}", ["train.dtype=fp32", f"parallel.zero_stage={stage}"])
        assert res == pytest.approx(ref[N:], rel=1e-5, abs=0), f"ZeRO-1 checkpoint resumed under ZeRO-{stage}"


def test_export_of_a_gpu_trained_checkpoint(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from hpframe.export import load_model_state
    from hpframe.models import build_model

    run, _ = uninterrupted(tmp_path, "export", PATHS["bf16_fp32master_zero1"])
    ckpt = run / "checkpoints" / f"step_{2 * N:08d}"
    proc = subprocess.run([sys.executable, "-m", "hpframe.export", str(ckpt), str(tmp_path / "hf")], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    cfg, state = load_model_state(ckpt)
    ours = build_model(cfg.model, cfg.moe)
    ours.init_weights(0)
    ours.load_state_dict(state, strict=True)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # both on the CPU in fp32, as the CPU export test compares them
        mine = ours.eval()(tokens)
        hf = theirs.eval()(tokens).logits
    assert (mine - hf).abs().max().item() < 1e-5
