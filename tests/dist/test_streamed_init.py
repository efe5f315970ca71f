"""parallelize on a META model (init_seed): every rank materializes and initializes only its own parts,
one block at a time, and gets bit-identical shards to the classic path (full model built and
initialized on every rank, then sliced). 4 gloo processes, three layouts:

  mixtral_debug  tp2 x dp2 = ep2   (TP shards of attention/embedding/head, EP slices of the experts)
  deepseek_debug pp2 x dp2 = ep2   (MLA, a dense first block, pipeline stages: other stages stay meta)
  gpt_debug      tp2 x pp2         (tied embeddings: the last stage materializes the embedding too)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hpframe.testing.distributed import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "mixtral_tp2_ep2": ("mixtral_debug", ["parallel.tp=2", "parallel.dp=2", "parallel.ep=2"]),
    "deepseek_pp2_ep2": ("deepseek_debug", ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.grad_accum=2"]),
    "gpt_tp2_pp2": ("gpt_debug", ["parallel.tp=2", "parallel.pp=2", "parallel.grad_accum=2"]),
}


def _worker(rank: int, world: int) -> dict:
    from conftest import compose_run_config

    from hpframe.models import build_model
    from hpframe.parallel import parallelize
    from hpframe.parallel.groups import build_groups
    from hpframe.parallel.parallelize import owned_parts
    from hpframe.plan import make_plan

    out = {}
    for name, (recipe, overrides) in CASES.items():
        cfg = compose_run_config(f"recipe={recipe}", *overrides)
        plan = make_plan(cfg, world)
        groups = build_groups(plan)
        rg = plan.experts.routing_groups if plan.experts else None
        classic = build_model(cfg.model, cfg.moe, routing_groups=rg)
        classic.init_weights(cfg.train.seed)
        parallelize(classic, plan, groups)
        with torch.device("meta"):
            streamed = build_model(cfg.model, cfg.moe, routing_groups=rg)
        parallelize(streamed, plan, groups, init_seed=cfg.train.seed)
        stage = plan.ranks.coords(rank)["pp"]
        outer, blocks = owned_parts(streamed, plan, stage)
        owned = tuple(outer) + tuple(f"layers.{i}" for i in blocks)
        a, b = classic.state_dict(), streamed.state_dict()
        assert a.keys() == b.keys(), name
        mismatched, compared, wrong_meta = [], 0, []
        for k in a:
            mine = any(k == p or k.startswith(p + ".") for p in owned)
            if b[k].is_meta == mine:  # owned parts must be real, the others meta
                wrong_meta.append(k)
            elif mine:
                compared += 1
                if not torch.equal(a[k], b[k]):
                    mismatched.append(k)
        bufs = {n: t for n, t in streamed.named_buffers() if not t.is_meta}
        for n, t in classic.named_buffers():
            if n in bufs and not torch.equal(t, bufs[n]):
                mismatched.append(n)
        real = sum(p.numel() for p in streamed.parameters() if not p.is_meta)
        out[name] = {"mismatched": mismatched, "wrong_meta": wrong_meta, "compared": compared,
                     "real": real, "full": sum(p.numel() for p in build_model(cfg.model, cfg.moe,
                                                                              routing_groups=rg).parameters()),
                     "stage": stage, "blocks": blocks}
    return out


@pytest.mark.dist
@pytest.mark.timeout(240)
def test_streamed_shards_equal_classic_shards() -> None:
    results = run_distributed(_worker, 4, timeout=220)
    for rank, r in enumerate(results):
        for name, c in r.items():
            assert c["mismatched"] == [] and c["wrong_meta"] == [], (rank, name, c)
            assert c["compared"] > 0
            assert c["real"] < c["full"], (rank, name)  # no rank holds the whole model
    # with pp2 the two stages materialize different blocks
    assert results[0]["deepseek_pp2_ep2"]["blocks"] != results[-1]["deepseek_pp2_ep2"]["blocks"]
