"""Engine behaviour beyond equivalence, on CPU with gloo (2 processes):
  * checkpoint resume through hpframe's portable checkpoints (``Checkpointer`` + ``manager.load``): save
    after step 1, run steps 2-3, load, run steps 2-3 again -> bit-identical losses, grad norms and
    parameters (EP with ZeRO 0 and 1; pipeline + MoE + router bias with ZeRO 1; pp2 x dp2 x ep2);
  * a non-finite loss on one rank skips the step on every rank: parameters, Adam state (moments and
    step count) and router bias untouched; the next (finite) step equals the single-process reference's
    first step, and its moe_stats count every routed assignment of the global batch once;
  * the wiring DeepSpeed sees: has_moe_layers, hpframe's EP/EDP groups in DeepSpeed's registry with
    the plan's rank lists, DeepSpeed's own clipping off."""

from __future__ import annotations

import pytest
import torch

from engine_cases import SEED, Case, global_batches, reference, routing_groups
from hpframe.testing.distributed import run_distributed

pytestmark = pytest.mark.dist


def _build(cfg, world_size: int):
    from hpframe.engine import build_engine
    from hpframe.models import build_model
    from hpframe.parallel.groups import build_groups
    from hpframe.parallel.parallelize import parallelize
    from hpframe.plan import make_plan

    plan = make_plan(cfg, world_size)
    groups = build_groups(plan)
    model = build_model(cfg.model, cfg.moe, routing_groups=routing_groups(cfg))
    model.init_weights(SEED)
    parallelize(model, plan, groups)
    return plan, build_engine(model, plan, groups, cfg)


def _mine(plan, rank: int, step: int, cfg):
    d = plan.ranks.coords(rank)["dp"]
    return global_batches(cfg, plan.dp, step)[d * plan.grad_accum:(d + 1) * plan.grad_accum]


def _snapshot(engine) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    out.update({n: b.detach().clone() for n, b in engine.module.named_buffers() if n.endswith("expert_bias")})
    return out


def _resume_worker(rank: int, world_size: int, cfgs: list, root: str) -> list[dict]:
    from hpframe.checkpoint import manager
    from hpframe.checkpoint.async_save import Checkpointer
    from hpframe.engine.ds_env import prepare_deepspeed
    from hpframe.engine.moe_bridge import release_expert_groups

    prepare_deepspeed()
    out = []
    for i, cfg in enumerate(cfgs):
        plan, engine = _build(cfg, world_size)
        engine.train_step(_mine(plan, rank, 0, cfg))
        path = Checkpointer(engine, f"{root}/case{i}").save(1, {"step": 1}).path
        first = [engine.train_step(_mine(plan, rank, s, cfg)) for s in (1, 2)]
        after_first = _snapshot(engine)
        # Disturb the live state so that a load that restored nothing would be caught.
        engine.train_step(_mine(plan, rank, 5, cfg))
        client = manager.load(engine, path)
        second = [engine.train_step(_mine(plan, rank, s, cfg)) for s in (1, 2)]
        after_second = _snapshot(engine)
        out.append({
            "client": client,
            "first": [(r.loss, r.grad_norm) for r in first],
            "second": [(r.loss, r.grad_norm) for r in second],
            "param_diff": max(float((after_first[k] - after_second[k]).abs().max()) for k in after_first),
        })
        release_expert_groups(plan)
    return out


def test_checkpoint_resume_is_exact(tmp_path) -> None:
    cases = [
        Case("ep2-mixtral", "mixtral_debug", ["parallel.dp=2", "parallel.ep=2"]).cfg(0),
        Case("ep2-mixtral", "mixtral_debug", ["parallel.dp=2", "parallel.ep=2"]).cfg(1),
        Case("pp2-deepseek", "deepseek_debug", ["parallel.pp=2", "parallel.dp=1"]).cfg(1),
    ]
    results = run_distributed(_resume_worker, 2, (cases, str(tmp_path)), timeout=300)
    for rank, per_rank in enumerate(results):
        for i, r in enumerate(per_rank):
            assert r["client"]["step"] == 1
            assert r["first"] == r["second"], f"rank {rank} case {i}"
            assert r["param_diff"] == 0.0, f"rank {rank} case {i}: {r['param_diff']}"


def _adam_state(opt) -> list[torch.Tensor]:
    """Every tensor of the optimizer state (ZeRO creates zero moments at build time), in a fixed order."""
    return [
        torch.as_tensor(v).clone() for st in opt.state.values() for _, v in sorted(st.items())
    ]


def _skip_worker(rank: int, world_size: int, cfg) -> dict:
    import deepspeed.utils.groups as ds_groups

    from hpframe.engine.ds_env import prepare_deepspeed
    from hpframe.engine.moe_bridge import release_expert_groups
    from hpframe.models import Router

    prepare_deepspeed()
    plan, engine = _build(cfg, world_size)
    wiring = {
        "has_moe_layers": engine.ds.has_moe_layers,
        "ds_clip": engine.ds.gradient_clipping(),
        "ep_ranks": list(ds_groups._get_expert_parallel_group_ranks("ep_size_2")),
        "edp_ranks": list(ds_groups._get_expert_data_parallel_group_ranks("ep_size_2")),
        "plan_ep": list(plan.ranks.group("ep", rank)),
        "plan_edp": list(plan.ranks.group("edp", rank)),
    }
    before = _snapshot(engine)
    inner = getattr(engine.ds.optimizer, "optimizer", engine.ds.optimizer)  # the AdamW under ZeRO
    state_before = _adam_state(inner)
    norm_w = engine.module.norm.weight
    saved = norm_w.detach().clone()
    if rank == 0:
        with torch.no_grad():
            norm_w[0] = float("nan")
    bad = engine.train_step(_mine(plan, rank, 0, cfg))
    with torch.no_grad():
        norm_w.copy_(saved)
    unchanged = max(float((before[k] - v).abs().max()) for k, v in _snapshot(engine).items())
    state_after = _adam_state(inner)
    if state_before:
        adam_changed = len(state_before) != len(state_after) or any(
            not torch.equal(a, b) for a, b in zip(state_before, state_after)
        )
    else:  # the fused kernel's first (skipped) step creates the state: zero moments, step count 0
        adam_changed = any(bool(t.ne(0).any()) for t in state_after)
    load_left = max(float(m.load_accum.abs().max()) for m in engine.module.modules() if isinstance(m, Router))
    good = engine.train_step(_mine(plan, rank, 0, cfg))
    release_expert_groups(plan)
    return {**wiring, "bad_skipped": bad.skipped, "unchanged": unchanged, "adam_changed": adam_changed,
            "load_left": load_left, "good": (good.skipped, good.loss, good.grad_norm), "stats": good.moe_stats,
            "moe_layers": list(plan.moe_layers), "assignments": plan.global_batch_size * cfg.data.seq_len * cfg.moe.top_k}


def _skip_jobs(rank: int, world_size: int, cfgs: list) -> list[dict]:
    return [_skip_worker(rank, world_size, cfg) for cfg in cfgs]


def test_nonfinite_loss_skips_everywhere() -> None:
    case = Case("ep2-deepseek", "deepseek_debug", ["parallel.dp=2", "parallel.ep=2"])
    cfgs = [case.cfg(0), case.cfg(1)]  # ZeRO 0 (param.grad) and ZeRO 1 (partitioned gradients)
    ref = reference(cfgs[0], 2)
    for rank, per_rank in enumerate(run_distributed(_skip_jobs, 2, (cfgs,), timeout=240)):
        for r in per_rank:
            assert r["has_moe_layers"] is True and r["ds_clip"] == 0.0
            assert r["ep_ranks"] == r["plan_ep"] == [0, 1] and r["edp_ranks"] == r["plan_edp"] == [rank]
            assert r["bad_skipped"] is True, f"rank {rank}"
            assert r["unchanged"] == 0.0 and not r["adam_changed"] and r["load_left"] == 0.0, r
            skipped, loss, norm = r["good"]
            assert not skipped
            assert loss == pytest.approx(ref["loss"][0], rel=1e-5) and norm == pytest.approx(ref["norm"][0], rel=1e-5)
            # moe_stats: global routed assignments per layer = tokens of the global batch x top_k
            for layer in r["moe_layers"]:
                assert sum(r["stats"][f"layer{layer}/tokens_per_expert"]) == r["assignments"]
            assert r["stats"]["max_load_cv"] == max(r["stats"][f"layer{i}/load_cv"] for i in r["moe_layers"])


def test_checkpoint_resume_pipeline_with_expert_parallelism(tmp_path) -> None:
    """pp2 x dp2 x ep2, ZeRO 0: each stage's experts written by their EP ranks, dense tensors by dp rank 0."""
    cases = [Case("pp2xep2-deepseek", "deepseek_debug", ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2"]).cfg(0)]
    results = run_distributed(_resume_worker, 4, (cases, str(tmp_path)), timeout=300)
    for rank, (r,) in enumerate(results):
        assert r["client"]["step"] == 1
        assert r["first"] == r["second"], f"rank {rank}"
        assert r["param_diff"] == 0.0, f"rank {rank}: {r['param_diff']}"


def _reduce_worker(rank: int, world_size: int, cfg) -> dict:
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine

    from hpframe.engine.ds_env import prepare_deepspeed
    from hpframe.engine.moe_bridge import release_expert_groups

    prepare_deepspeed()
    plan, engine = _build(cfg, world_size)
    ds = engine.ds
    flattened: list[int] = []
    flatten = ds.flatten
    ds.flatten = lambda bucket: (flattened.append(sum(t.numel() for t in bucket)), flatten(bucket))[1]

    def reduced(deepspeed_own: bool) -> dict[str, torch.Tensor]:
        """Gradients of one micro-batch after the engine's ZeRO-0 reduction (hpframe's or DeepSpeed's own)."""
        flattened.clear()
        for p in ds.module.parameters():
            p.grad = None
        tokens, targets = _mine(plan, rank, 0, cfg)[0]
        loss = engine._lm_loss(ds(tokens), targets) + ds.module.aux_loss.float()
        if deepspeed_own:
            ds.allreduce_no_retain = lambda *a, **k: DeepSpeedEngine.allreduce_no_retain(ds, *a, **k)
        ds.set_gradient_accumulation_boundary(True)  # reduce after this backward
        try:
            ds.backward(loss)
        finally:
            ds.__dict__.pop("allreduce_no_retain", None)
            ds.set_gradient_accumulation_boundary(None)
        return {n: p.grad.clone() for n, p in ds.module.named_parameters()}

    ours = reduced(False)
    ours_flat = list(flattened)
    theirs = reduced(True)
    theirs_flat = list(flattened)
    dense = sum(p.numel() for p in ds.module.parameters() if not is_moe_param(p))
    experts = sum(p.numel() for p in ds.module.parameters() if is_moe_param(p))
    release_expert_groups(plan)
    return {"equal": all(torch.equal(ours[k], theirs[k]) for k in ours), "ours_flat": ours_flat,
            "theirs_flat": theirs_flat, "dense": dense, "experts": experts}


def test_zero0_reduction_skips_groups_of_one_rank() -> None:
    """dp2 x ep2 with ZeRO 0: dense gradients are all-reduced over dp (2 ranks) by DeepSpeed's bucketed
    path; expert gradients live on an expert-data-parallel group of one rank, where hpframe only
    applies DeepSpeed's 1/dp scaling in place. The gradients must be bit-identical to DeepSpeed's own
    reduction, which flattens and copies back every bucket, the experts' too."""
    cfg = Case("ep2-mixtral", "mixtral_debug", ["parallel.dp=2", "parallel.ep=2"]).cfg(0)
    for rank, r in enumerate(run_distributed(_reduce_worker, 2, (cfg,), timeout=240)):
        assert r["equal"], f"rank {rank}: gradients differ from DeepSpeed's own reduction"
        assert sum(r["ours_flat"]) == r["dense"], r  # only the dense buckets were flattened
        assert sum(r["theirs_flat"]) == r["dense"] + r["experts"], r
