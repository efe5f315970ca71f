"""moe.dispatch in the planner: the hierarchical fetch's bytes and memory by hand, the auto choice,
its memory fallback, the refused combinations, and the plan JSON. No processes."""

from __future__ import annotations

import json

import pytest

from hpframe.checkpoint.manager import plan_fingerprint
from hpframe.plan import make_plan
from hpframe.plan.errors import PlanError
from hpframe.plan.memory import GIB
from hpframe.plan.report import render_json

# mixtral_debug: 4 MoE blocks of 8 experts, 3 x 128 x 256 fp32 weights each; 1024 tokens per micro-batch.
EXPERT = 3 * 128 * 256 * 4
NODES2 = ("recipe=mixtral_debug", "parallel.dp=4", "parallel.ep=4", "cluster.nodes=2", "cluster.gpus_per_node=2")


def test_hierarchical_fetch_bytes_by_hand(compose_cfg) -> None:
    # ep=4 over n=2 nodes of k=2: S = 2 experts per rank; per op and layer (n-1)*S inter, (k-1)*n*S intra;
    # ops per micro-batch: 1 all-gather + 1 reduce-scatter; 4 MoE blocks, 1 micro-batch.
    plan = make_plan(compose_cfg(*NODES2, "moe.dispatch=experts"))
    s = 2 * EXPERT
    assert plan.comm.moe_move_experts == {"intra": 2 * 4 * (2 - 1) * 2 * s, "inter": 2 * 4 * (2 - 1) * s}
    assert plan.comm.parts["moe_fetch_experts"] == plan.comm.moe_move_experts
    assert plan.comm.parts["moe_all_to_all"] == {"intra": 0, "inter": 0} and plan.comm.all_to_all_calls == 0
    assert plan.comm.fetch_calls == 2 * 2 * 4  # two levels x (gather + reduce-scatter) x 4 blocks
    # one node (n=1, k=4): a flat all-gather of (ep-1)*S; full recompute fetches twice per micro-batch
    one = make_plan(compose_cfg("recipe=mixtral_debug", "parallel=dp4_ep2", "parallel.ep=4", "moe.dispatch=experts",
                                "parallel.recompute=full"))
    assert one.comm.moe_move_experts == {"intra": 3 * 4 * 3 * s, "inter": 0}
    # tokens: the same run's all-to-all figure is the chosen part, the fetch kept for comparison
    tok = make_plan(compose_cfg(*NODES2))
    assert tok.experts.dispatch == "tokens" and tok.comm.parts["moe_fetch_experts"] == {"intra": 0, "inter": 0}
    assert tok.comm.moe_move_experts == plan.comm.moe_move_experts


def test_fetched_weight_memory_by_hand(compose_cfg) -> None:
    tok = make_plan(compose_cfg(*NODES2))
    exp = make_plan(compose_cfg(*NODES2, "moe.dispatch=experts"))
    full = 8 * EXPERT  # one layer's gathered experts
    # 4 layers kept for backward (1 micro-batch in flight) + one layer's gradient twice (regrouped by node position)
    assert exp.memory.fetched_experts == 4 * full + 2 * full
    assert exp.memory.total == tok.memory.total + exp.memory.fetched_experts
    # full recompute keeps only the block being recomputed and the next prefetch
    rc = make_plan(compose_cfg(*NODES2, "moe.dispatch=experts", "parallel.recompute=full"))
    assert rc.memory.fetched_experts == 2 * full + 2 * full


def test_auto_picks_by_time_and_reports_both(compose_cfg) -> None:
    # many tokens, tiny experts: fetching the experts moves fewer bytes than the tokens
    small = make_plan(compose_cfg(*NODES2, "moe.dispatch=auto", "moe.expert_ffn_hidden_size=16"))
    assert small.experts.dispatch == "experts", small.dispatch
    d = small.dispatch
    assert d.requested == "auto" and d.experts.seconds < d.tokens.seconds and d.reason.startswith("auto: experts")
    # few tokens, big experts: tokens
    big = make_plan(compose_cfg(*NODES2, "moe.dispatch=auto", "data.seq_len=16", "parallel.micro_batch_size=1"))
    assert big.experts.dispatch == "tokens" and big.dispatch.tokens.seconds <= big.dispatch.experts.seconds
    doc = json.loads(render_json(small, compose_cfg(*NODES2, "moe.dispatch=auto", "moe.expert_ffn_hidden_size=16")))
    dd = doc["experts"]["dispatch"]
    assert dd["chosen"] == "experts" and dd["requested"] == "auto"
    assert dd["experts"]["intra_bytes"] == doc["comm_bytes_per_step"]["moe_dispatch"]["experts"]["intra"] > 0
    assert doc["comm_bytes_per_step"]["moe_dispatch"]["tokens"]["inter"] == dd["tokens"]["inter_bytes"] > 0
    assert doc["memory_per_gpu_bytes"]["fetched_experts"] == small.memory.fetched_experts > 0


def test_auto_falls_back_when_fetched_weights_do_not_fit(compose_cfg) -> None:
    over = ("moe.expert_ffn_hidden_size=16",)
    fits = make_plan(compose_cfg(*NODES2, *over, "moe.dispatch=auto"))
    assert fits.experts.dispatch == "experts"
    # a device just large enough for the tokens plan, not for the fetched weights on top
    tok = make_plan(compose_cfg(*NODES2, *over))
    gb = (tok.memory.total + fits.memory.fetched_experts / 2) / GIB
    plan = make_plan(compose_cfg(*NODES2, *over, "moe.dispatch=auto", f"cluster.gpu_memory_gb={gb}"))
    assert plan.experts.dispatch == "tokens" and plan.memory.fetched_experts == 0
    assert any("moe.dispatch=auto" in w and "falling back to moe.dispatch=tokens" in w and "fetched expert weights" in w
               for w in plan.warnings), plan.warnings
    with pytest.raises(PlanError, match="fetched experts .* under moe.dispatch=experts"):
        make_plan(compose_cfg(*NODES2, *over, "moe.dispatch=experts", f"cluster.gpu_memory_gb={gb}"))


def test_refused_by_name_and_excluded_from_auto(compose_cfg) -> None:
    over = ("parallel.dp=4", "parallel.ep=4", "parallel.zero_stage=0", "train.overlap_optimizer=true")
    with pytest.raises(PlanError, match="moe.dispatch=experts cannot run.*train.overlap_optimizer") as err:
        make_plan(compose_cfg("recipe=mixtral_debug", *over, "moe.dispatch=experts"))
    assert "train.overlap_optimizer" in err.value.key and "moe.dispatch" in err.value.key
    auto = make_plan(compose_cfg("recipe=mixtral_debug", *over, "moe.dispatch=auto", "moe.expert_ffn_hidden_size=16"))
    assert auto.experts.dispatch == "tokens" and "excluded" in auto.dispatch.reason
    # an EP group of 4 over nodes of 3 GPUs: 3 ranks on one node, 1 on the other
    uneven = ("recipe=mixtral_debug", "parallel.dp=6", "parallel.ep=2", "cluster.nodes=2", "cluster.gpus_per_node=3",
              "parallel.global_batch_size=48")
    with pytest.raises(PlanError, match="spans its nodes unevenly"):
        make_plan(compose_cfg(*uneven, "moe.dispatch=experts"))
    # capacity dropping is honoured (capacity applies to each rank's own tokens in both modes)
    assert make_plan(compose_cfg(*NODES2, "moe.dispatch=experts", "moe.dropless=false")).experts.dispatch == "experts"


def test_no_effect_warnings_and_checkpoint_fingerprint(compose_cfg) -> None:
    one = make_plan(compose_cfg("recipe=mixtral_debug", "moe.dispatch=experts"))
    assert one.experts.dispatch == "tokens" and any("no effect with parallel.ep=1" in w for w in one.warnings)
    dense = make_plan(compose_cfg("recipe=gpt_debug", "moe.dispatch=auto"))
    assert any("moe.dispatch=auto has no effect" in w for w in dense.warnings)
    # checkpoints do not depend on the dispatch mode: a run may switch it across a resume
    cfgs = [compose_cfg(*NODES2, f"moe.dispatch={m}") for m in ("tokens", "experts")]
    assert plan_fingerprint(make_plan(cfgs[0]), cfgs[0]) == plan_fingerprint(make_plan(cfgs[1]), cfgs[1])
