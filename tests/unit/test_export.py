"""``python -m hpframe.export`` on real training checkpoints (CPU, fp32).

Per debug recipe (Mixtral and DeepSeek-V3 families): ``launch.py`` trains 2 steps and saves; the
export CLI writes safetensors + config.json; transformers loads them (no missing or unexpected keys)
as MixtralForCausalLM / DeepseekV3ForCausalLM, and its logits equal those of hpframe's single-device
model loaded from the same checkpoint to 1e-5. The DeepSeek run moves its aux-loss-free router biases,
so the exported selection bias is nonzero and matters. A corrupted checkpoint file makes the export
exit with code 2 and name the file, and so does a file that its manifest does not list.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hpframe.export import load_model_state  # noqa: E402
from hpframe.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
ATOL = 1e-5


def train_two_steps(recipe: str, run_dir: Path) -> Path:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    cmd = [sys.executable, str(REPO / "launch.py"), f"recipe={recipe}", "train=smoke", "train.steps=2", "data.seq_len=32",
           "parallel.micro_batch_size=2", "data.num_synthetic_tokens=50000", "train.progress=false", "train.tensorboard=false",
           "checkpoint.resume=none", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir / "checkpoints" / "step_00000002"


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpframe.export", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("recipe,hf_class", [("mixtral_debug", "MixtralForCausalLM"), ("deepseek_debug", "DeepseekV3ForCausalLM")])
def test_export_loads_in_transformers_with_equal_logits(recipe, hf_class, tmp_path):
    ckpt = train_two_steps(recipe, tmp_path / "run")
    proc = export_cli(str(ckpt), str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32, output_loading_info=True)
    assert type(theirs).__name__ == hf_class
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    cfg, state = load_model_state(ckpt)
    ours = build_model(cfg.model, cfg.moe, routing_groups=cfg.moe.num_expert_groups)
    ours.init_weights(0)  # fills the non-persistent rotary tables; every weight is then overwritten
    ours.load_state_dict(state, strict=True)
    if recipe == "deepseek_debug":
        assert state["layers.1.mlp.router.expert_bias"].abs().sum() > 0  # bias balancing moved it
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = ours.eval()(tokens)
        b = theirs.eval()(tokens).logits
    assert (a - b).abs().max().item() < ATOL


def test_export_of_a_corrupted_checkpoint_names_the_file(tmp_path):
    ckpt = train_two_steps("mixtral_debug", tmp_path / "run")
    victim = ckpt / "tensors" / "rank00000.safetensors"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = export_cli(str(ckpt), str(tmp_path / "hf"))
    assert proc.returncode == 2
    assert f"{victim}: sha256 differs from the manifest (corrupted)" in proc.stderr
    # repaired, plus another rank's part that the manifest does not list: refused, never merged
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    extra = ckpt / "layout" / "rank00001.json"
    extra.write_text((ckpt / "layout" / "rank00000.json").read_text())
    proc = export_cli(str(ckpt), str(tmp_path / "hf"))
    assert proc.returncode == 2
    assert f"{extra}: not listed in {ckpt / 'MANIFEST.json'}" in proc.stderr
