"""Shared pieces of the engine equivalence tests: the single-process reference and the per-rank check.

A case is (recipe, parallel overrides, zero stage). The reference trains the full model in one
process on all dp x grad_accum micro-batches of each step (same micro-batch size, so routing,
capacity and balance losses see the same tokens) with torch.optim.AdamW, clip_grad_norm_ and the
router bias update; each rank of the parallel run trains its shard through ``build_engine`` and
compares its losses, grad norms and every local parameter (its TP / EP / pipeline slice of the
reference's) after the last step.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import compose_run_config  # noqa: E402

STEPS = 3
EVAL_STEP = 99  # seed offset of the evaluation batches
SEED = 1234
# Small batches keep each case fast; a tiny clip keeps clipping active (checked on the reference).
BASE = ["parallel.micro_batch_size=2", "parallel.grad_accum=2", "data.seq_len=16", "train.grad_clip=0.05",
        "train.lr=0.001", "train.weight_decay=0.1"]


@dataclass
class Case:
    name: str
    recipe: str
    overrides: list[str] = field(default_factory=list)

    def cfg(self, zero: int):
        return compose_run_config(f"recipe={self.recipe}", *BASE, *self.overrides, f"parallel.zero_stage={zero}")


def global_batches(cfg, dp: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """dp * grad_accum micro-batches of step ``step``: (tokens, next tokens), int64 [B, S]."""
    g = torch.Generator().manual_seed(SEED + 17 * step)
    b, s, v = cfg.parallel.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    n = dp * cfg.parallel.grad_accum
    seq = torch.randint(0, v, (n, b, s + 1), generator=g)
    return [(seq[i, :, :-1].contiguous(), seq[i, :, 1:].contiguous()) for i in range(n)]


def build_rank_engine(cfg, groups=None):
    """(engine, plan, groups) of this rank for ``cfg`` through run.py's path: plan, groups, model
    initialized from ``cfg.train.seed``, parallelize, build_engine. Pass ``groups`` to reuse the process
    groups of an earlier build with the same layout (DeepSpeed registers expert groups once)."""
    from hpframe.engine import build_engine
    from hpframe.models import build_model
    from hpframe.parallel import init_distributed, parallelize
    from hpframe.plan import make_plan

    plan = make_plan(cfg)
    groups = groups or init_distributed(plan)
    model = build_model(cfg.model, cfg.moe, routing_groups=plan.experts.routing_groups if plan.experts else None)
    model.init_weights(cfg.train.seed)
    return build_engine(parallelize(model, plan, groups), plan, groups, cfg), plan, groups


def rank_batches(cfg, plan, rank: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share (by its dp coordinate) of ``global_batches`` of ``step``."""
    d = plan.ranks.coords(rank)["dp"]
    return global_batches(cfg, plan.dp, step)[d * plan.grad_accum:(d + 1) * plan.grad_accum]


def routing_groups(cfg) -> int:
    return cfg.moe.num_expert_groups


def reference(cfg, dp: int) -> dict:
    """Single-process training of the same global batches; returns per-step numbers and final params."""
    from hpframe.models import Router, build_model

    torch.manual_seed(SEED)
    model = build_model(cfg.model, cfg.moe, routing_groups=routing_groups(cfg))
    model.init_weights(SEED)
    t = cfg.train
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2),
    )
    out = {"loss": [], "lm": [], "aux": [], "norm": []}
    for step in range(STEPS):
        batches = global_batches(cfg, dp, step)
        lms, auxs = [], []
        for x, y in batches:
            logits = model(x)
            lm = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            aux = model.aux_loss.float()
            ((lm + aux) / len(batches)).backward()
            lms.append(lm.item())
            auxs.append(aux.item())
        # fp64 norm: torch's fp32 vector_norm is off by ~3e-5 relative on the sparse embedding gradient
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = float(sum(g.double().pow(2).sum() for g in grads).sqrt())
        coef = t.grad_clip / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, Router):
                    m.update_bias(m.load_accum.clone())
        out["lm"].append(sum(lms) / len(lms))
        out["aux"].append(sum(auxs) / len(auxs))
        out["loss"].append(out["lm"][-1] + out["aux"][-1])
        out["norm"].append(norm)
    out["params"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        evals = [F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item() for x, y in global_batches(cfg, dp, EVAL_STEP)]
    out["eval"] = sum(evals) / len(evals)
    return out


def reference_name(local: str, num_layers: int, pipelined: bool) -> str:
    """Name in the single-process Transformer of a parameter named ``local`` on this rank."""
    if not pipelined:
        return local
    head, rest = local.split(".", 1)
    i = int(head)
    if i == 0:
        return rest  # "embed.weight"
    if i == num_layers + 1:
        return "embed.weight" if rest.startswith("tied.") else rest  # norm.*, head.*, tied.weight
    return f"layers.{i - 1}.{rest.removeprefix('block.')}"


def reference_slice(param: torch.nn.Parameter, full: torch.Tensor, name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """The part of the reference tensor ``full`` this rank's ``param`` holds (TP shard and/or expert slice)."""
    ref = full
    ids = getattr(param, "_hp_expert_ids", None)
    if ids is not None:
        ref = ref[ids.start:ids.stop]
    if getattr(param, "tensor_model_parallel", False):
        dim = getattr(param, "partition_dim", 0)
        ref = ref.chunk(tp, dim=dim)[tp_rank]
    assert ref.shape == param.shape, f"{name}: local {tuple(param.shape)} vs reference slice {tuple(ref.shape)}"
    return ref


def run_case_on_rank(rank: int, cfg, world_size: int, expected: dict) -> dict:
    """Build, train STEPS steps, compare with ``expected``; returns the largest relative differences."""
    from hpframe.engine import build_engine
    from hpframe.engine.moe_bridge import release_expert_groups
    from hpframe.models import build_model
    from hpframe.parallel.expert import ExpertParallelExperts
    from hpframe.parallel.groups import build_groups
    from hpframe.parallel.parallelize import parallelize
    from hpframe.plan import make_plan

    import time

    t0 = time.perf_counter()
    plan = make_plan(cfg, world_size)
    groups = build_groups(plan)
    torch.manual_seed(SEED)
    model = build_model(cfg.model, cfg.moe, routing_groups=routing_groups(cfg))
    model.init_weights(SEED)
    parallelize(model, plan, groups, sequence_parallel=cfg.parallel.sequence_parallel, recompute=cfg.parallel.recompute)
    for mod in model.modules():
        if isinstance(mod, ExpertParallelExperts):
            for p in mod.parameters():
                p._hp_expert_ids = mod.global_expert_ids
    t1 = time.perf_counter()
    engine = build_engine(model, plan, groups, cfg)
    t2 = time.perf_counter()
    coords = plan.ranks.coords(rank)
    got = {"loss": [], "lm": [], "aux": [], "norm": [], "skipped": []}
    for step in range(STEPS):
        batches = global_batches(cfg, plan.dp, step)
        mine = batches[coords["dp"] * plan.grad_accum:(coords["dp"] + 1) * plan.grad_accum]
        engine.set_lr(cfg.train.lr)
        res = engine.train_step(mine)
        got["loss"].append(res.loss)
        got["lm"].append(res.lm_loss)
        got["aux"].append(res.aux_loss)
        got["norm"].append(res.grad_norm)
        got["skipped"].append(res.skipped)
    eval_batches = global_batches(cfg, plan.dp, EVAL_STEP)
    got["eval"] = [engine.eval_step(eval_batches[coords["dp"] * plan.grad_accum:(coords["dp"] + 1) * plan.grad_accum])]
    expected = {**expected, "eval": [expected["eval"]]}
    t3 = time.perf_counter()
    diffs = {"seconds": {"groups_model": t1 - t0, "engine": t2 - t1, "steps": t3 - t2}}
    for key in ("loss", "lm", "aux", "norm", "eval"):
        a, b = torch.tensor(got[key], dtype=torch.float64), torch.tensor(expected[key], dtype=torch.float64)
        diffs[key] = float(((a - b).abs() / b.abs().clamp_min(1e-6)).max())
    worst, worst_name, worst_abs, num_off, num_el = 0.0, "", 0.0, 0, 0
    for name, p in engine.module.named_parameters():
        ref_name = reference_name(name, cfg.model.num_layers, plan.pp > 1)
        ref = reference_slice(p, expected["params"][ref_name], name, plan.tp, coords["tp"])
        delta = (p.detach().float() - ref).abs()
        diff = float(delta.max())
        num_off += int((delta > 1e-3 * cfg.train.lr).sum())
        num_el += delta.numel()
        d = diff / float(ref.abs().max().clamp_min(1e-6))
        worst_abs = max(worst_abs, diff)
        if d > worst:
            worst, worst_name = d, name
    diffs["bias"] = 0.0  # router expert_bias moves by +-rate per step: any disagreement is >= rate
    for name, buf in engine.module.named_buffers():
        if name.endswith("expert_bias"):
            ref = expected["params"][reference_name(name, cfg.model.num_layers, plan.pp > 1)]
            diffs["bias"] = max(diffs["bias"], float((buf.float() - ref).abs().max()))
    diffs["params"] = worst
    diffs["params_in_lr_steps"] = worst_abs / cfg.train.lr
    diffs["frac_off"] = num_off / max(num_el, 1)  # elements more than 1e-3 lr away from the reference
    diffs["params_worst"] = worst_name
    diffs["skipped"] = any(got["skipped"])
    diffs["num_params"] = sum(1 for _ in engine.module.parameters())
    diffs["got"] = got
    release_expert_groups(plan)
    return diffs
