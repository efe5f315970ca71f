"""Round trip through the command line: a transformers checkpoint -> ``launch.py model.from_hf=DIR``, 2 steps
at learning rate 0 -> ``python -m hpframe.export`` -> the source's tensors back, bit for bit (fp32).

Three layouts of 2 gloo processes, one per ZeRO stage: Qwen3-MoE at tp=2 with ZeRO-0 (its 101-token
vocabulary is padded to 102 rows for the run, and export writes 101 back), Mixtral at pp=2 with ZeRO-1
(each stage saves its own blocks; export joins them) and DeepSeek-V3 (YaRN rotary) at dp=2 x ep=2 with
ZeRO-2. transformers then loads the export with no missing or unexpected keys, its config.json keeps
the source's rope scaling, and the source's tokenizer files come along (AutoTokenizer encodes alike).
The padded tp=2 run then resumes at tp=1: refused (exit 2) with its padding, resumed with the saved one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from hpframe.testing.hf_models import write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def write_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer of ``vocab`` ids, saved the way transformers saves tokenizers."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab - 1)} | {"<unk>": vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(str(out))


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


CASES = {
    "qwen3_moe_tp2_zero0": ("qwen3_moe", ["parallel.tp=2", "parallel.zero_stage=0"]),
    "mixtral_pp2_zero1": ("mixtral", ["parallel.pp=2", "parallel.zero_stage=1"]),
    "deepseek_v3_dp2_ep2_zero2": ("deepseek_v3", ["parallel.dp=2", "parallel.ep=2", "parallel.zero_stage=2"]),
}


@pytest.mark.timeout(400)
@pytest.mark.parametrize("case", list(CASES))
def test_from_hf_train_at_lr0_export_gives_the_source_back(case: str, tmp_path: Path) -> None:
    family, layout = CASES[case]
    src = tmp_path / "src"
    write_checkpoint(family, src)
    write_tokenizer(src, 101)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    cmd = [sys.executable, str(REPO / "launch.py"), f"model.from_hf={src}", "train=smoke", "train.steps=2", "train.lr=0",
           "train.min_lr=0", "moe.bias_update_rate=0", "data.seq_len=24", "parallel.micro_batch_size=2",
           "data.num_synthetic_tokens=20000", "train.progress=false", "train.tensorboard=false", "checkpoint.resume=none",
           f"hydra.run.dir={tmp_path / 'run'}", *layout]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = subprocess.run([sys.executable, "-m", "hpframe.export", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "out")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert exp.returncode == 0, exp.stderr

    a, b = all_tensors(src), all_tensors(tmp_path / "out")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    src_cfg, out_cfg = (json.loads((p / "config.json").read_text()) for p in (src, tmp_path / "out"))
    assert {k: out_cfg["rope_parameters"][k] for k in src_cfg["rope_parameters"]} == src_cfg["rope_parameters"]
    assert out_cfg["vocab_size"] == 101 and out_cfg["dtype"] == "float32"
    text = "w3 w17 w99 w0"
    tok_src = transformers.AutoTokenizer.from_pretrained(str(src))
    tok_out = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok_out(text)["input_ids"] == tok_src(text)["input_ids"] == [3, 17, 99, 0]
    if "tp2" in case:
        check_resume_at_tp1(cmd, tmp_path / "run", env)


def check_resume_at_tp1(cmd: list[str], run: Path, env: dict[str, str]) -> None:
    """The tp=2 run padded 101 rows to 102: resumed at tp=1 (which pads to 101) it is refused with exit
    code 2 naming model.vocab_pad_multiple and both row counts, its checkpoint intact; with the saved padding
    it resumes."""
    base = [c for c in cmd if not c.startswith(("parallel.tp=", "train.steps=", "checkpoint.resume="))]
    base += ["train.steps=3", "checkpoint.resume=auto"]
    proc = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout + proc.stderr  # the refusal is a log line
    assert ("model.vocab_pad_multiple: checkpoint" in out and "holds 102 vocabulary rows (model.vocab_size=101 "
            "padded to a multiple of 2), this run's model 101 (model.vocab_size=101, model.vocab_pad_multiple=1); "
            "resume with model.vocab_pad_multiple=2" in out), out[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]
    proc = subprocess.run([*base, "model.vocab_pad_multiple=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resumed from" in proc.stdout + proc.stderr and "step 3/3" in proc.stdout + proc.stderr
