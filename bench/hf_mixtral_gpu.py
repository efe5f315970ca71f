"""Fine-tune start on one GPU: a Mixtral-8x7B-shaped checkpoint (fewer layers) through model.from_hf vs from scratch.

    PYTHONPATH=. python bench/hf_mixtral_gpu.py [--layers 2] [--steps 20] [--out DIR] [-- extra overrides]
    PYTHONPATH=. python bench/hf_mixtral_gpu.py --tiny --seq 64 --steps 5 --ckpt /tmp/tiny   # CPU smoke run

1. transformers writes a MixtralForCausalLM with Mixtral-8x7B's widths (hidden 4096, 32 query / 8
   key-value heads, 8 experts of 14336, top-2, vocabulary 32000) but ``--layers`` blocks, random weights
   (its own initialization), bf16, in 5 GB shards: what a published checkpoint looks like on disk.
2. ``launch.py model.from_hf=DIR`` trains ``--steps`` steps from it (bf16, ZeRO-0, bf16 master weights:
   the plain update of the mixtral_h200 recipe, batch ``--batch`` x ``--seq`` tokens, synthetic data).
3. The same architecture from scratch: the same overrides with model.from_hf dropped (the fields its
   config.json filled in stay), random initialization.
Recorded per run: the time from the process start to the first step (loading included), tokens/s
(median of the steps after the 3rd), the first and last loss, the peak memory line, plus the planner's
estimate. Writes hf_mixtral_gpu.json (with commit and versions) and the two runs' logs into --out
($OUT on the device machine). Needs a GPU with about 60 GB for 2 layers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent


MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                    rope_theta=1e6, rms_norm_eps=1e-5)
"""Mixtral-8x7B-v0.1's config.json fields (all but num_hidden_layers)."""
TINY = MIXTRAL_8X7B | dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2)
"""--tiny: the same family at a size a CPU runs in seconds (checks the script's plumbing, not a figure)."""


def write_checkpoint(path: Path, layers: int, shape: dict[str, Any]) -> float:
    """``shape``'s widths, ``layers`` blocks, transformers' random init, bf16; returns the seconds it took."""
    import torch
    import transformers

    t0 = time.perf_counter()
    config = transformers.MixtralConfig(num_hidden_layers=layers, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialization is faster on the GPU
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(path), max_shard_size="5GB")
    del model
    return time.perf_counter() - t0


def run(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """One launch.py run; its metrics summarized."""
    run_dir = out / name
    cmd = [sys.executable, str(REPO / "launch.py"), *overrides, f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "tail": (proc.stdout + proc.stderr)[-2000:]}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "loss" in r and "tokens_per_s" in r]
    step_time = sum(r.get("step_time_s", 0.0) for r in steps)
    peak = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "peak device memory" in ln]
    return {
        "wall_s": round(wall, 1),
        "start_to_first_step_s": round(wall - step_time, 1),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in steps[3:]) if len(steps) > 3 else None,
        "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
        "peak_memory": peak[-1] if peak else None,
        "command": " ".join(cmd),
    }


def main() -> None:
    from bench.common import environment
    from hpframe.config.hf_config import expand_overrides

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--ckpt", default="/tmp/mixtral8x7b_shape")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/results/local"))
    parser.add_argument("--tiny", action="store_true", help="small widths and CPU overrides: a smoke run of the script")
    parser.add_argument("extra", nargs="*", help="more launch.py overrides for both runs")
    args = parser.parse_args()
    out, ckpt = Path(args.out), Path(args.ckpt)
    out.mkdir(parents=True, exist_ok=True)
    write_s = None if (ckpt / "config.json").is_file() else write_checkpoint(ckpt, args.layers, TINY if args.tiny else MIXTRAL_8X7B)
    settings = {"recipe": "mixtral_h200", "train.steps": args.steps, "train.dtype": "bf16", "train.master_dtype": "bf16",
                "parallel.zero_stage": 0, "parallel.micro_batch_size": args.batch, "data.seq_len": args.seq,
                "data.num_synthetic_tokens": 2_000_000, "train.progress": "false", "train.tensorboard": "false",
                "checkpoint.enabled": "false", "checkpoint.resume": "none"}
    if args.tiny:
        settings |= {"cluster": "cpu", "train.device": "cpu", "train.dtype": "fp32", "train.master_dtype": "fp32",
                     "train.compile": "false", "data.num_synthetic_tokens": 50_000}
    common = [f"{k}={v}" for k, v in settings.items()] + list(args.extra)
    from_hf = expand_overrides([f"model.from_hf={ckpt}", f"model.max_seq_len={args.seq}", *common])
    scratch = [o for o in from_hf if not o.startswith("model.from_hf=")]
    results: dict[str, Any] = {
        "checkpoint": {"path": str(ckpt), "layers": args.layers, "write_s": write_s,
                       "bytes": sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))},
        "from_hf": run("from_hf", from_hf, out),
        "from_scratch": run("from_scratch", scratch, out),
        "environment": environment(),
    }
    (out / "hf_mixtral_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "environment"}, indent=1))


if __name__ == "__main__":
    main()
