"""Shared by the TP/EP equivalence tests: compose a debug recipe, run it sharded and as one process.

Each spawned rank builds the same full model (``init_weights(seed)``), keeps an unsharded copy as
the single-process reference, shards the other with ``parallelize`` and runs its own micro-batch.
The reference runs every data-parallel rank's micro-batch separately (so capacity sees the same
tokens as the sharded run) and averages the losses. Gradients of the sharded model are reduced the
way a data-parallel engine would (dense: sum over dp / dp; experts: sum over edp / dp), gathered back
to full shape (TP shards along ``partition_dim`` over tp, expert slices along dim 0 over ep) and
compared parameter by parameter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Tiny shapes: the recipes' architecture, fewer layers, short sequences.
SMALL = ["model.num_layers=2", "data.seq_len=16", "parallel.micro_batch_size=2", "train.dtype=fp32"]


def compose_run_config(recipe: str, overrides: list[str]) -> Any:
    """RunConfig of ``recipe`` with ``overrides`` (Hydra compose, as launch.py does)."""
    from hydra import compose, initialize_config_dir

    from hpframe.config.convert import to_run_config
    from hpframe.config.store import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"recipe={recipe}", *SMALL, *overrides])
    return to_run_config(cfg)


@dataclass
class Case:
    """One comparison: a composed config plus how to run it."""

    name: str
    cfg: Any
    world_size: int
    starve: tuple[int, ...] = ()  # experts the router must never choose (expert_bias -1e4)
    sequence_parallel: bool = False
    recompute: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)


def case(name: str, recipe: str, world_size: int, overrides: list[str], **kw: Any) -> Case:
    return Case(name, compose_run_config(recipe, overrides), world_size, **kw)


def _gather(t: torch.Tensor, group: Any, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reference(model: Any, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, list[torch.Tensor]]:
    """Mean over micro-batches of (CE + aux), one forward per micro-batch; grads left on the model."""
    total, logits = 0.0, []
    for tokens, targets in batches:
        out = model(tokens)
        loss = F.cross_entropy(out.flatten(0, 1), targets.flatten()) + model.aux_loss
        (loss / len(batches)).backward()
        total += loss.item() / len(batches)
        logits.append(out.detach())
    return total, logits


def run_case(c: Case, rank: int) -> dict[str, Any]:
    """Run one case on this rank; return numbers for the parent to check."""
    from hpframe.models import build_model
    from hpframe.parallel import build_groups, parallelize, vocab_parallel_cross_entropy
    from hpframe.plan import make_plan

    cfg = c.cfg
    plan = make_plan(cfg, c.world_size)
    groups = build_groups(plan)
    routing_groups = plan.experts.routing_groups if plan.experts is not None else None
    ref = build_model(cfg.model, cfg.moe, routing_groups=routing_groups)
    ref.init_weights(cfg.train.seed)
    with torch.no_grad():
        for m in ref.moe_modules():
            m.router.expert_bias[list(c.starve)] = -1e4
    model = copy.deepcopy(ref)

    gen = torch.Generator().manual_seed(1000 + cfg.train.seed)
    mb, s, v = plan.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    data = torch.randint(0, v, (plan.dp * mb, s + 1), generator=gen)
    batches = [(data[d * mb : (d + 1) * mb, :-1], data[d * mb : (d + 1) * mb, 1:]) for d in range(plan.dp)]
    ref_loss, ref_logits = _reference(ref, batches)

    parallelize(model, plan, groups, sequence_parallel=c.sequence_parallel, recompute=c.recompute,
                ep_overlap=c.cfg.parallel.ep_overlap)
    routed: list[torch.Tensor] = []
    for m in model.moe_modules():
        m.router.register_forward_hook(lambda mod, args, out: routed.append(out.topk_idx.detach()))
    d = plan.ranks.coords(rank)["dp"]
    tokens, targets = batches[d]
    logits = model(tokens)
    loss = vocab_parallel_cross_entropy(logits, targets, groups.tp) + model.aux_loss
    loss.backward()

    out: dict[str, Any] = {"case": c.name, "rank": rank, "ref_loss": ref_loss}
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=groups.dp)
    out["loss"] = mean_loss.item() / plan.dp
    full_logits = _gather(logits.detach(), groups.tp, dim=-1)
    out["logits_err"] = (full_logits - ref_logits[d]).abs().max().item()
    out["logits_scale"] = ref_logits[d].abs().max().item()

    ref_params = dict(ref.named_parameters())
    grad_err: dict[str, tuple[float, float]] = {}
    none_grads, shapes = [], {}
    for name, p in model.named_parameters():
        if p.grad is None:
            none_grads.append(name)
            continue
        g = p.grad.detach().clone()
        is_expert = getattr(p, "expert_parallel", False)
        dist.all_reduce(g, group=groups.edp if is_expert else groups.dp)
        g /= plan.dp
        if getattr(p, "tensor_model_parallel", False):
            g = _gather(g, groups.tp, dim=p.partition_dim)
        if is_expert:
            g = _gather(g, groups.ep, dim=0)
        gref = ref_params[name].grad
        shapes[name] = (tuple(p.shape), tuple(g.shape))
        if gref is None:
            grad_err[name] = (float("inf"), 0.0)
            continue
        grad_err[name] = ((g - gref).abs().max().item(), gref.abs().max().item())
    out.update(grad_err=grad_err, none_grads=none_grads, shapes=shapes)
    out["num_params"] = len(ref_params)
    # Expert bookkeeping: rows received per EP module and the routed expert ids of this rank.
    out["rows_received"] = [
        int(m.experts.stats["rows_received_per_rank"].sum()) for m in model.moe_modules() if getattr(m.experts, "stats", None)
    ]
    out["rows_sent"] = [m.experts.stats["rows_sent_per_rank"].tolist() for m in model.moe_modules() if getattr(m.experts, "stats", None)]
    out["expert_grad_abs"] = {
        n: p.grad.abs().max().item() for n, p in model.named_parameters() if getattr(p, "expert_parallel", False)
    }
    out["topk_idx"] = routed
    out["node_of_ep_rank"] = [plan.ranks.node_of(r) for r in groups.ranks["ep"]]
    out["experts_per_rank"] = plan.experts.experts_per_rank if plan.experts is not None else 0
    out["dropped_frac"] = [float(m.stats["dropped_frac"]) for m in model.moe_modules()]
    return out


def worker(rank: int, world_size: int, cases: list[Case]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    return [run_case(c, rank) for c in cases]


def check(results: list[list[dict[str, Any]]], *, rtol: float = 1e-5) -> None:
    """Assert every rank of every case matched its reference (loss, logits, every gradient)."""
    for rank_results in results:
        for r in rank_results:
            tag = f"{r['case']} rank {r['rank']}"
            assert abs(r["loss"] - r["ref_loss"]) <= rtol * max(1.0, abs(r["ref_loss"])), (tag, r["loss"], r["ref_loss"])
            assert r["logits_err"] <= rtol * r["logits_scale"], (tag, r["logits_err"], r["logits_scale"])
            assert not r["none_grads"], (tag, "parameters without gradient", r["none_grads"])
            assert len(r["grad_err"]) == r["num_params"], (tag, "parameter count", len(r["grad_err"]), r["num_params"])
            bad = {n: e for n, e in r["grad_err"].items() if not e[0] <= 1e-7 + rtol * e[1]}
            assert not bad, (tag, "gradients differ (max abs err, max abs ref)", bad)
