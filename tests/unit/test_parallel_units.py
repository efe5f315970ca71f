"""Parallel building blocks without processes (tp = ep = 1 paths and user errors).

Compared: ColumnParallelLinear / RowParallelLinear / VocabParallelEmbedding without a group against
nn.Linear / nn.Embedding; vocab_parallel_cross_entropy against F.cross_entropy (with ignored
targets); full and selective activation recomputation against the same model without it (loss and
every gradient, Mixtral-like and DeepSeek-V3-like debug models). Errors: messages name the key and
the numbers (world size, divisibility, group sizes).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
from _equivalence import compose_run_config  # noqa: E402

from hpframe.models import build_model  # noqa: E402
from hpframe.models.moe import GroupedExperts  # noqa: E402
from hpframe.parallel import ParallelGroups, init_distributed, parallelize, vocab_parallel_cross_entropy  # noqa: E402
from hpframe.parallel.act_ckpt import apply_activation_checkpointing  # noqa: E402
from hpframe.parallel.expert import ExpertParallelExperts  # noqa: E402
from hpframe.parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding  # noqa: E402
from hpframe.plan import make_plan  # noqa: E402


def test_single_rank_layers_equal_torch_layers() -> None:
    torch.manual_seed(0)
    lin, emb = nn.Linear(8, 6, bias=False), nn.Embedding(10, 4)
    x, tok = torch.randn(3, 5, 8), torch.randint(0, 10, (3, 5))
    col = ColumnParallelLinear.from_linear(lin, None, what="w")
    row = RowParallelLinear.from_linear(lin, None, what="w")
    assert torch.equal(col(x), lin(x)) and torch.equal(row(x), lin(x))
    assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0 and row.weight.partition_dim == 1
    assert torch.equal(VocabParallelEmbedding(emb, None)(tok), emb(tok))
    with pytest.raises(ValueError, match="bias-free"):
        ColumnParallelLinear.from_linear(nn.Linear(8, 6), None, what="w")
    with pytest.raises(ValueError, match="w: tensor parallelism supports bias-free linears only"):
        RowParallelLinear.from_linear(nn.Linear(8, 6), None, what="w")


def test_vocab_parallel_cross_entropy_single_rank_matches_torch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 7))
    targets[0, :3] = -100
    got = vocab_parallel_cross_entropy(logits, targets, None)
    want = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(got, want)
    per_token = vocab_parallel_cross_entropy(logits, targets, None, reduction="none")
    assert per_token.shape == (2, 7) and torch.all(per_token[0, :3] == 0)
    with pytest.raises(ValueError, match="reduction must be"):
        vocab_parallel_cross_entropy(logits, targets, None, reduction="avg")


def test_expert_parallel_rejects_uneven_split() -> None:
    experts = GroupedExperts(6, 4, 8, "swiglu")
    with pytest.raises(ValueError, match="moe.num_experts=6 is not divisible by parallel.ep=4"):
        ExpertParallelExperts(experts, global_expert_ids=range(0, 1), ep_group=None, ep_size=4)
    with pytest.raises(ValueError, match="contiguous"):
        ExpertParallelExperts(experts, global_expert_ids=range(0, 6, 2), ep_group=None, ep_size=2)


def test_init_distributed_checks_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(compose_run_config("mixtral_debug", ["parallel.dp=2", "parallel.ep=2"]), 2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE=3 but the plan needs 2 ranks"):
        init_distributed(plan, backend="gloo")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert "WORLD_SIZE" not in os.environ
    with pytest.raises(ValueError, match="the plan needs 2 ranks"):
        init_distributed(plan, backend="gloo")


def test_parallelize_checks_group_sizes() -> None:
    cfg = compose_run_config("mixtral_debug", ["parallel.tp=2", "parallel.dp=1"])
    plan = make_plan(cfg, 2)
    alone = {a: (0,) for a in ("tp", "pp", "dp", "ep", "edp", "mp", "embedding")}
    groups = ParallelGroups(0, 1, None, None, None, None, None, None, None, ranks=alone)
    with pytest.raises(ValueError, match="the tp group has 1 ranks but the plan says parallel.tp=2"):
        parallelize(build_model(cfg.model, cfg.moe), plan, groups)


@pytest.mark.parametrize("recipe", ["mixtral_debug", "deepseek_debug"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_keeps_loss_and_gradients(recipe: str, mode: str) -> None:
    cfg = compose_run_config(recipe, [])
    ref = build_model(cfg.model, cfg.moe)
    ref.init_weights(7)
    model = apply_activation_checkpointing(copy.deepcopy(ref), mode)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    calls = {"ref": 0, "model": 0}  # rotary tables are read inside attention: once, or again on recompute
    ref.layers[0].attn.rotary.register_forward_hook(lambda *a: calls.__setitem__("ref", calls["ref"] + 1))
    model.layers[0].attn.rotary.register_forward_hook(lambda *a: calls.__setitem__("model", calls["model"] + 1))
    losses = []
    for m in (ref, model):
        logits = m(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + m.aux_loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert calls == {"ref": 1, "model": 2}
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # the router's load counters (aux-loss-free bias update, load stats) count each token once,
    # not again when the recompute re-runs the router inside backward
    for r_ref, r_model in zip(ref.moe_modules(), model.moe_modules()):
        assert float(r_model.router.load_accum.sum()) == float(r_ref.router.load_accum.sum()) > 0


def test_init_distributed_single_process_without_launcher() -> None:
    """No RANK/WORLD_SIZE and a one-rank plan: a gloo group of one on a free port (own interpreter)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from _equivalence import compose_run_config;"
        "from hpframe.plan import make_plan; from hpframe.parallel import init_distributed;"
        "import torch.distributed as dist;"
        "g = init_distributed(make_plan(compose_run_config('mixtral_debug', []), 1));"
        "print(dist.get_backend(), dist.get_world_size(), [g.size(a) for a in ('tp', 'pp', 'dp', 'ep', 'edp')]);"
        "dist.destroy_process_group()"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    dist_dir = str(Path(__file__).resolve().parents[1] / "dist")
    out = subprocess.run([sys.executable, "-c", code, dist_dir], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "gloo 1 [1, 1, 1, 1, 1]"
