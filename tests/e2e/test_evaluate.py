"""``python -m hpframe.evaluate`` gives the in-training evaluation's numbers, at other layouts.

A JSON Lines corpus is prepared (trained BPE), a mixtral_debug run (2 layers) trains 4 steps on it at
pp=2 with ``data.document_mask=true`` and evaluates at step 4, saving a checkpoint there. The
standalone evaluation of that checkpoint, with the same data, at 1 process, at tp=2 with sequence
parallelism and at dp=2 x ep=2 (2 processes each),
must report the same eval_loss to 1e-6 relative, the same perplexity and token count, and step 4.
Because the 1-process figure goes through the flat model with positions and the training figure
through the pipeline stages, their equality also shows that every stage applies the document mask
(tests/unit/test_document_mask.py shows the masked model equals separate documents and that the mask
changes the logits). A model directory (tiny Qwen3-MoE written by transformers) evaluates to
transformers' own loss on the same held-out documents. User errors exit 2 (in process). CPU, gloo;
five launches of 5-15 s each.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from hpframe.data.prepare import prepare

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.dist]
MODEL = ["model.num_layers=2", "model.vocab_size=512", "data=tokenized", "data.seq_len=32", "parallel.micro_batch_size=2",
         "train.eval_steps=2", "data.document_mask=true"]


def run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.timeout(400)
def test_standalone_evaluation_equals_in_training_evaluation(tmp_path):
    rng = random.Random(0)
    words = "the cat sat on a mat dog ran to park big small red blue green house tree".split()
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))}) + "\n"
                           for _ in range(400)))
    data = tmp_path / "ds"
    prepare([src], data, vocab_size=300)
    run_dir = tmp_path / "run"
    ok(run(["launch.py", *MODEL, f"data.path={data}", "parallel.pp=2", "parallel.grad_accum=2", "train.steps=4",
            "train.eval_interval=4", "checkpoint.interval=4", "train.progress=false", f"hydra.run.dir={run_dir}"]))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (trained,) = [r for r in lines if "eval_loss" in r]
    ckpt = run_dir / "checkpoints" / "step_00000004"
    tp2_sp = ["parallel.pp=1", "parallel.tp=2", "parallel.grad_accum=1", "parallel.sequence_parallel=true"]
    dp2_ep2 = ["parallel.pp=1", "parallel.dp=2", "parallel.ep=2", "parallel.grad_accum=1"]
    for layout in (["parallel.pp=1", "parallel.grad_accum=1"], tp2_sp, dp2_ep2):
        out = tmp_path / f"eval_{'_'.join(o.split('.')[-1] for o in layout)}"
        stdout = ok(run(["-m", "hpframe.evaluate", str(ckpt), f"data.path={data}", *layout, f"output_dir={out}"]))
        (line,) = [x for x in stdout.splitlines() if x.startswith("eval: ")]
        got = json.loads(line[len("eval: "):])
        assert got == json.loads((out / "eval.json").read_text())
        assert got["step"] == trained["step"] == 4 and got["eval_tokens"] == trained["eval_tokens"] == 2 * 2 * 32
        assert got["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-6), (layout, got, trained)
        assert got["eval_ppl"] == pytest.approx(trained["eval_ppl"], rel=1e-5)
        assert got["layout"]["world_size"] == (1 if len(layout) == 2 else 2)


def test_evaluate_user_errors(tmp_path, capsys):
    from hpframe.evaluate import main

    assert main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere' not found (a checkpoint directory" in capsys.readouterr().err
    assert main([str(tmp_path), "data.seq_len"]) == 2
    assert "overrides must be key=value, got ['data.seq_len']" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_model_directory_evaluation_equals_transformers(tmp_path):
    """``hpframe.evaluate MODEL_DIR`` (a tiny Qwen3-MoE written by transformers, with a tokenizer.json
    built here) with data prepared by that directory's tokenizer and data.document_mask=true: its loss
    equals transformers' mean token cross-entropy on the same held-out sequences, each document run
    through transformers alone (1e-5 relative)."""
    import torch
    import torch.nn.functional as F
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from hpframe.data.dataset import ShardedTokens, split_sequences
    from hpframe.data.loader import eval_batches
    from hpframe.testing.hf_models import write_checkpoint

    model_dir = tmp_path / "qwen"
    hf = write_checkpoint("qwen3_moe", model_dir)
    rng = random.Random(1)
    words = "alpha beta gamma delta eps zeta eta theta iota kappa lambda mu".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<eos>"], show_progress=False))
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = tmp_path / "ds"
    meta = prepare([tmp_path / "docs.jsonl"], data, tokenizer=model_dir)
    out = tmp_path / "eval"
    stdout = ok(run(["-m", "hpframe.evaluate", str(model_dir), f"data.path={data}", "data.seq_len=16",
                     "data.eval_fraction=0.1", "data.document_mask=true", "parallel.micro_batch_size=2",
                     "train.eval_steps=2", f"output_dir={out}"]))
    got = json.loads((out / "eval.json").read_text())
    assert f"eval: {json.dumps(got)}" in stdout and got["step"] == 0 and got["source"] == str(model_dir)

    _, held_out = split_sequences(ShardedTokens(data), 16, 0.1)
    losses = []
    with torch.no_grad():
        for batch in eval_batches(held_out, micro_batch_size=2, num_batches=2, dp=1, dp_rank=0):
            tokens, targets = batch[:, :-1], batch[:, 1:]
            for row, target in zip(tokens, targets):  # documents end with the EOS; each runs alone
                cuts = [0] + [i + 1 for i, t in enumerate(row.tolist()) if t == meta["eos_id"] and i + 1 < len(row)] + [len(row)]
                logits = torch.cat([hf(row[a:b][None]).logits[0] for a, b in zip(cuts, cuts[1:])])
                losses.append(F.cross_entropy(logits, target, reduction="none"))
    reference = torch.cat(losses).mean().item()
    assert got["eval_loss"] == pytest.approx(reference, rel=1e-5)
