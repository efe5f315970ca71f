"""Time and peak resident memory per rank to stream a transformers checkpoint into 1, 2 and 4 CPU processes.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/hf_stream.py [--out DIR]

Writes a Mixtral-shaped checkpoint of about 400 MB (fp32, random weights, saved by transformers in
100 MB shards), then for each layout spawns gloo processes that do what ``hpframe.run`` does with
``model.from_hf``: meta model, ``HFCheckpoint.check``, ``parallelize(weights=...)``. Per rank it
records the seconds of check + load, the rank's own shard bytes, the largest single tensor of the
files, and memory: ``peak_rss`` (VmHWM after the load minus VmRSS before it: everything the load
added at its worst moment, the safetensors files' mapped pages included) and ``peak_anon``
(anonymous memory only, sampled every 2 ms: what the process allocated, excluding page cache that
the kernel can drop). The claim under test: the peak grows with the rank's shard plus one tensor,
not with the model. Output: hf_stream.json (with commit and versions) in --out.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

import torch

LAYOUTS = {1: [], 2: ["parallel.dp=2", "parallel.ep=2"], 4: ["parallel.tp=2", "parallel.dp=2", "parallel.ep=2"]}
SHAPE = dict(vocab_size=16000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)


def _status(field: str) -> int:
    """A VmXXX/RssXXX line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class AnonSampler(threading.Thread):
    """Polls RssAnon every 2 ms; ``peak`` is the largest value seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = _status("RssAnon"), threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(0.002)


def _worker(rank: int, world: int, path: str, cfg: Any) -> dict[str, Any]:
    from hpframe.models import build_model
    from hpframe.parallel import parallelize
    from hpframe.parallel.groups import build_groups
    from hpframe.plan import make_plan
    from hpframe.run import open_hf_weights, resolve_vocab_padding

    plan = make_plan(cfg, world)
    groups = build_groups(plan)
    resolve_vocab_padding(cfg, plan.tp)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe, routing_groups=plan.experts.routing_groups)
    torch.distributed.barrier()
    rss0, anon0 = _status("VmRSS"), _status("RssAnon")
    sampler = AnonSampler()
    sampler.start()
    t0 = time.perf_counter()
    weights = open_hf_weights(path, model)
    model = parallelize(model, plan, groups, weights=weights)
    seconds = time.perf_counter() - t0
    hwm = _status("VmHWM")
    sampler.stop.set()
    sampler.join()
    largest = max(4 * torch.Size(weights.shape(n)).numel() for n in weights.files)
    weights.close()
    shard = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    return {"rank": rank, "seconds": round(seconds, 3), "shard_mb": round(shard / 2**20, 1),
            "largest_tensor_mb": round(largest / 2**20, 1),
            "peak_rss_mb": round((hwm - rss0) / 2**20, 1),
            "peak_anon_mb": round((sampler.peak - anon0) / 2**20, 1)}


def main() -> None:
    import transformers

    from bench.common import environment
    from hpframe.config.hf_config import expand_overrides
    from hpframe.testing.distributed import run_distributed
    from tests.conftest import compose_run_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/local")
    parser.add_argument("--ckpt", default="/tmp/hpframe_hf_stream_ckpt")
    args = parser.parse_args()
    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").is_file():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**SHAPE), dtype=torch.float32)
        model.save_pretrained(str(ckpt), max_shard_size="100MB")
        del model
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    results: dict[str, Any] = {"checkpoint_mb": round(size / 2**20, 1), "shape": SHAPE, "layouts": {}}
    for world, layout in LAYOUTS.items():
        cfg = compose_run_config(*expand_overrides([f"model.from_hf={ckpt}", "data.seq_len=128", *layout]))
        per_rank = run_distributed(_worker, world, (str(ckpt), cfg), timeout=900)
        results["layouts"][f"{world} ({' '.join(layout) or 'one process'})"] = per_rank
        print(world, layout, json.dumps(per_rank))
    results["environment"] = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_stream.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out / 'hf_stream.json'}")


if __name__ == "__main__":
    main()
