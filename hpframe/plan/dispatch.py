"""moe.dispatch: move tokens to the experts (all-to-all) or experts to the tokens (fetch), and why.

Both modes compute the same function and leave the same gradients on the experts' owners
(tests/dist/test_dispatch_equivalence.py); they differ in what crosses the links:

  tokens   per MoE layer and micro-batch, 4 all-to-alls of T x top_k rows of H values (6 under full
           recompute), spread over the EP group as routing falls (hpframe/plan/comm.py)
  experts  per MoE layer and micro-batch, a hierarchical all-gather of the layer's expert weights
           (across nodes once per node, then shared inside it) and a reduce-scatter of their
           gradients, independent of the tokens (hpframe/plan/fetch.py); plus memory for the
           fetched weights until backward

The planner costs both for the busiest pipeline stage: seconds = intra bytes / intra_node_bw +
inter bytes / inter_node_bw (all-to-all bytes at cluster.all_to_all_efficiency of the link) +
cluster.collective_latency_us per call. ``auto`` picks the faster mode (tokens on a tie) among those
that can run; ``experts`` is excluded from auto, and refused when asked for by name, when
``dispatch_refusals`` names a reason, and under auto falls back to tokens with a warning when its
memory estimate exceeds the device.
"""

from __future__ import annotations

import dataclasses

from hpframe.config.schema import Dispatch, RunConfig
from hpframe.plan.comm import moe_all_to_all, moe_all_to_all_calls
from hpframe.plan.errors import PlanError
from hpframe.plan.fetch import ep_nodes, fetch_bytes, fetch_calls, fetched_weight_bytes
from hpframe.plan.memory import GIB, estimate_memory
from hpframe.plan.types import DispatchOption, DispatchPlan, ParallelPlan


def dispatch_refusals(cfg: RunConfig, plan: ParallelPlan) -> list[tuple[str, str]]:
    """(config keys, reason) for every setting moe.dispatch=experts cannot honour with this plan.

    Capacity-based dropping is NOT among them: capacity is applied to each rank's own tokens before
    the experts are reached, in both modes, so the same assignments are dropped.
    """
    out: list[tuple[str, str]] = []
    _, k = ep_nodes(plan)
    if k == 0:
        out.append(("parallel.ep, cluster.gpus_per_node", f"one EP group (parallel.ep={plan.ep}) spans its nodes "
                    f"unevenly (cluster.gpus_per_node={plan.gpus_per_node}): the hierarchical fetch needs the same "
                    "number of EP ranks on every node"))
    if cfg.train.overlap_optimizer:
        out.append(("train.overlap_optimizer", "the overlapped update rewrites each block's experts just before its "
                    "forward, but the fetch of a layer's experts starts during the previous layer"))
    return out


def _seconds(cfg: RunConfig, intra: int, inter: int, calls: int, efficiency: float) -> float:
    c = cfg.cluster
    return (intra / (c.intra_node_bw_GBps * 1e9) + inter / (c.inter_node_bw_GBps * 1e9)) / efficiency \
        + calls * c.collective_latency_us * 1e-6


def dispatch_options(cfg: RunConfig, plan: ParallelPlan) -> tuple[DispatchOption, DispatchOption]:
    """(tokens, experts) costed on the stage where each is slowest; ``experts.refused`` says why it cannot run."""
    tok: DispatchOption | None = None
    exp: DispatchOption | None = None
    refused = "; ".join(f"{keys}: {why}" for keys, why in dispatch_refusals(cfg, plan))
    for st in plan.pipeline.stages:
        a2a, calls = moe_all_to_all(cfg, plan, st), moe_all_to_all_calls(cfg, plan, st)
        t = DispatchOption("tokens", a2a["intra"], a2a["inter"], calls,
                           _seconds(cfg, a2a["intra"], a2a["inter"], calls, cfg.cluster.all_to_all_efficiency), 0)
        f, fcalls = fetch_bytes(cfg, plan, st), fetch_calls(cfg, plan, st)
        e = DispatchOption("experts", f["intra"], f["inter"], fcalls, _seconds(cfg, f["intra"], f["inter"], fcalls, 1.0),
                           fetched_weight_bytes(cfg, plan, st), refused)
        tok = t if tok is None or t.seconds > tok.seconds else tok
        exp = e if exp is None or e.seconds > exp.seconds else exp
    assert tok is not None and exp is not None
    return tok, exp


def _with_mode(plan: ParallelPlan, mode: str) -> ParallelPlan:
    assert plan.experts is not None
    return dataclasses.replace(plan, experts=dataclasses.replace(plan.experts, dispatch=mode))


def resolve_dispatch(cfg: RunConfig, plan: ParallelPlan, warnings: list[str]) -> ParallelPlan:
    """Return ``plan`` with ``experts.dispatch`` decided and ``dispatch`` (both options, the reason) set.

    Raises PlanError when moe.dispatch=experts names a combination ``dispatch_refusals`` rejects.
    """
    asked = Dispatch(cfg.moe.dispatch)
    if plan.experts is None:
        if asked != Dispatch.tokens and cfg.moe.num_experts == 0:
            warnings.append(f"moe.dispatch={asked.value} has no effect with moe.num_experts=0 (dense model)")
        return plan
    tok, exp = dispatch_options(cfg, plan)
    if plan.ep == 1:
        if asked == Dispatch.experts:
            warnings.append("moe.dispatch=experts has no effect with parallel.ep=1 (every expert is local)")
        return _decided(plan, asked, "tokens", "parallel.ep=1: every expert is local, nothing moves", tok, exp)
    if asked == Dispatch.tokens:
        return _decided(plan, asked, "tokens", "moe.dispatch=tokens", tok, exp)
    refusals = dispatch_refusals(cfg, plan)
    if asked == Dispatch.experts:
        if refusals:
            keys = ", ".join(k for k, _ in refusals)
            raise PlanError(f"moe.dispatch=experts cannot run this configuration: {exp.refused}; use moe.dispatch=tokens",
                            key=f"moe.dispatch, {keys}", values={"moe.dispatch": "experts", "parallel.ep": plan.ep})
        return _decided(plan, asked, "experts", "moe.dispatch=experts", tok, exp)
    if refusals:
        return _decided(plan, asked, "tokens", f"auto: experts excluded ({exp.refused})", tok, exp)
    if exp.seconds >= tok.seconds:
        return _decided(plan, asked, "tokens", f"auto: tokens {tok.seconds * 1e3:.3g} ms <= experts "
                        f"{exp.seconds * 1e3:.3g} ms of MoE communication per step", tok, exp)
    mem = estimate_memory(cfg, _with_mode(plan, "experts"))
    if mem.total > mem.device_bytes:
        warnings.append(
            f"moe.dispatch=auto: moving experts would take {exp.seconds * 1e3:.3g} ms instead of {tok.seconds * 1e3:.3g} ms "
            f"of MoE communication per step, but with {mem.fetched_experts / GIB:.2f} GiB of fetched expert weights the "
            f"estimate is {mem.total / GIB:.1f} GiB > cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g}; "
            "falling back to moe.dispatch=tokens")
        return _decided(plan, asked, "tokens", "auto: experts faster but its fetched weights do not fit", tok, exp)
    return _decided(plan, asked, "experts", f"auto: experts {exp.seconds * 1e3:.3g} ms < tokens "
                    f"{tok.seconds * 1e3:.3g} ms of MoE communication per step", tok, exp)


def _decided(plan: ParallelPlan, asked: Dispatch, chosen: str, reason: str, tok: DispatchOption,
             exp: DispatchOption) -> ParallelPlan:
    plan = _with_mode(plan, chosen)
    return dataclasses.replace(plan, dispatch=DispatchPlan(asked.value, chosen, reason, tok, exp))
