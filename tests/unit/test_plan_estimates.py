"""Memory, communication, time and checkpoint estimates against hand computations from the formulas
stated in docs/planner.md (small debug models on the cpu cluster). No processes."""

from __future__ import annotations

import math
import re

import pytest

from hpframe.plan import make_plan
from hpframe.plan.params import count_params

GPT_N = 1_049_728  # gpt_debug: 2048*128 + 4*(4*128*128 + 2*128*512 + 2*128) + 128


def test_gpt_debug_param_count(compose_cfg) -> None:
    cfg = compose_cfg("recipe=gpt_debug")
    assert count_params(cfg.model, cfg.moe).total == GPT_N


def test_memory_fp32_single_rank(compose_cfg) -> None:
    m = make_plan(compose_cfg("recipe=gpt_debug")).memory
    assert m.params_on_rank == GPT_N
    assert (m.weights, m.gradients, m.optimizer) == (4 * GPT_N, 4 * GPT_N, 8 * GPT_N)  # fp32 weights/grads, Adam m, v
    # activations per token and block (elements): attention 2*128 (norm in/out) + 3*128 (q, k, v) + 128 (core out),
    # MLP 2*128 + 2*512 (GELU in/out) = 2048 elements of 4 bytes; 4 blocks, 8*128 tokens, 1 micro-batch in flight,
    # plus logits and their fp32 softmax: 1024 tokens * 2048 * (4 + 4)
    assert m.activations == 2048 * 4 * 4 * 1024 + 1024 * 2048 * 8
    assert m.total == m.weights + m.gradients + m.optimizer + m.activations


def test_memory_bf16_zero1_with_experts(compose_cfg) -> None:
    cfg = compose_cfg("recipe=mixtral_debug", "parallel=dp2_ep2", "train.dtype=bf16")
    plan = make_plan(cfg)
    p = count_params(cfg.model, cfg.moe)
    experts = p.by_component["experts"]
    dense, local_experts = p.total - experts, experts // 2
    m = plan.memory
    assert m.weights == 2 * (dense + local_experts)
    # bf16 gradients plus BF16_Optimizer's unsharded fp32 gradient copy (ZeRO-1)
    assert m.gradients == (2 + 4) * (dense + local_experts)
    # ZeRO-1: fp32 master + m + v (12 bytes) sharded over dp=2 for dense, over edp=1 for experts
    assert m.optimizer == int(12 * (dense / 2 + local_experts))


def test_memory_bf16_zero2_shards_the_fp32_gradients(compose_cfg) -> None:
    cfg = compose_cfg("recipe=gpt_debug", "parallel.dp=4", "parallel.zero_stage=2", "train.dtype=bf16")
    m = make_plan(cfg).memory
    assert m.gradients == int(2 * GPT_N / 4 + 4 * GPT_N / 4)


def test_zero_stages_shard_progressively(compose_cfg) -> None:
    m = {z: make_plan(compose_cfg("recipe=gpt_debug", "parallel.dp=4", f"parallel.zero_stage={z}")).memory for z in range(4)}
    assert m[0].optimizer == 8 * GPT_N and m[1].optimizer == 2 * GPT_N
    assert m[1].gradients == 4 * GPT_N and m[2].gradients == GPT_N
    assert m[2].weights == 4 * GPT_N and m[3].weights == GPT_N


def test_recompute_and_pipeline_in_flight(compose_cfg) -> None:
    acts = {r: make_plan(compose_cfg("recipe=mixtral_debug", f"parallel.recompute={r}")).memory.activations for r in ("none", "selective", "full")}
    assert acts["none"] > acts["selective"] > acts["full"]
    # 1F1B: stage 0 of 4 holds 4 micro-batches, stage 3 one
    plan = make_plan(compose_cfg("recipe=gpt_debug", "parallel.pp=4", "parallel.grad_accum=8"))
    assert plan.memory.stage == 0
    totals = plan.memory.per_stage_total
    assert totals[0] > totals[1] > totals[2]


def test_comm_dp_tp_pp_by_hand(compose_cfg) -> None:
    dp = make_plan(compose_cfg("recipe=gpt_debug", "parallel.dp=2")).comm
    assert dp.parts["dp"] == {"intra": 4 * GPT_N, "inter": 0}  # ring all-reduce: 2 * (1/2) * 4 bytes * N
    tp = make_plan(compose_cfg("recipe=gpt_debug", "parallel.tp=2")).comm
    # 4 all-reduces per block of 1024 tokens * 128 * 4 bytes, ring factor 2*(1/2), 4 blocks, 1 micro-batch
    assert tp.parts["tp"] == {"intra": 4 * 1024 * 128 * 4 * 4, "inter": 0}
    pp = make_plan(compose_cfg("recipe=gpt_debug", "parallel.pp=2")).comm  # grad_accum = 2
    assert pp.parts["pp"] == {"intra": 1024 * 128 * 4 * 2, "inter": 0}


def test_comm_moe_all_to_all_by_hand(compose_cfg) -> None:
    comm = make_plan(compose_cfg("recipe=mixtral_debug", "parallel=dp2_ep2")).comm
    # 1024 tokens * top-2 copies * 128 * 4 bytes * 4 exchanges * 4 MoE blocks, half of the copies leave the rank
    assert comm.parts["moe_all_to_all"] == {"intra": 1024 * 2 * 128 * 4 * 4 * 4 // 2, "inter": 0}
    # moving experts: the other rank's 4 experts of 3*128*256 fp32 weights, per MoE block (4) and micro-batch
    # (1): gathered once in forward, their gradients reduce-scattered once in backward
    assert comm.moe_move_experts == {"intra": 4 * 4 * 3 * 128 * 256 * 4 * 2, "inter": 0}


def test_comm_inter_node_split(compose_cfg) -> None:
    # two nodes of 2: dp group (0,1,2,3) spans both nodes, so the DP ring counts as inter-node
    comm = make_plan(compose_cfg("recipe=gpt_debug", "parallel.dp=4", "cluster.nodes=2")).comm
    assert comm.parts["dp"]["intra"] == 0 and comm.parts["dp"]["inter"] == int(2 * 3 / 4 * 4 * GPT_N)
    # EP over 2 nodes of 2: of 4 EP ranks, 1 on the own node, 2 on the other
    moe = make_plan(compose_cfg("recipe=mixtral_debug", "parallel.dp=4", "parallel.ep=4", "cluster.nodes=2")).comm
    per_copy = 1024 * 128 * 4 * 4 * 4
    assert moe.parts["moe_all_to_all"] == {"intra": int(per_copy * 2 * 1 / 4), "inter": int(per_copy * 2 * 2 / 4)}


def test_time_and_checkpoint(compose_cfg) -> None:
    cfg = compose_cfg("recipe=gpt_debug", "parallel.pp=2")
    plan = make_plan(cfg)
    t, c = plan.time, plan.checkpoint
    tokens = plan.global_batch_size * plan.seq_len
    bubble = 1 / 3  # (pp-1)/(grad_accum+pp-1) with grad_accum = 2
    assert t.bubble_fraction == pytest.approx(bubble)
    assert t.compute_seconds == pytest.approx(plan.flops_per_token * tokens / (2 * 0.2e12 * 0.4) / (1 - bubble))
    assert t.comm_seconds == pytest.approx(plan.comm.total / 5e9)
    assert c.bytes == GPT_N * (4 + 8)
    assert c.write_seconds == pytest.approx(c.bytes / 0.5e9)
    assert c.job_mtbf_seconds == pytest.approx(50_000 * 3600 / 2)
    assert c.interval_seconds == pytest.approx(math.sqrt(2 * c.write_seconds * c.job_mtbf_seconds))
    assert c.interval_steps == round(c.interval_seconds / t.step_seconds)


def test_deepseek_v3_checkpoint_interval(compose_cfg) -> None:
    plan = make_plan(compose_cfg("recipe=deepseek_v3"))
    c = plan.checkpoint
    assert c.bytes == 671_026_404_352 * 12  # the portable checkpoint: fp32 master weight, m, v (no bf16 copy)
    assert c.job_mtbf_seconds == pytest.approx(50_000 * 3600 / 2048)
    assert 1 <= c.interval_steps < 10_000


def test_tp_replicates_the_moe(compose_cfg) -> None:
    # hpframe/parallel/tensor.py splits attention, embedding and head over TP and replicates the MoE MLP
    cfg = compose_cfg("recipe=mixtral_debug", "parallel.tp=2")
    plan = make_plan(cfg)
    h, v = 128, 2048
    attn = h * 128 + 2 * h * 64 + 128 * h
    moe = h * 8 + 8 * 3 * h * 256
    assert plan.memory.params_on_rank == 4 * (attn // 2 + moe + 2 * h) + v * h // 2 * 2 + h
    # only attention talks over TP in an MoE block: 2 all-reduces of 1024*128 fp32 values, ring factor 2*(1/2)
    assert plan.comm.parts["tp"] == {"intra": 4 * 2 * 1024 * 128 * 4, "inter": 0}
    # every TP rank dispatches all 1024 tokens of its micro-batch (tp2 pp2 dp2 ep2: 2 MoE blocks per stage,
    # grad_accum 2, half of the top-2 copies leave the rank)
    comm = make_plan(compose_cfg("recipe=mixtral_debug", "parallel=tp2_pp2_dp2")).comm
    assert comm.parts["moe_all_to_all"] == {"intra": 1024 * 2 * 128 * 4 * 4 * 2 * 2 // 2, "inter": 0}


def test_all_to_all_time_uses_the_calibrated_efficiency_and_call_latency(compose_cfg) -> None:
    """EP all-to-all: bytes at cluster.all_to_all_efficiency of the link plus a latency per call
    (4 row exchanges + 1 count exchange per MoE layer and micro-batch); the other parts at link speed."""
    over = ("recipe=mixtral_h200", "cluster.gpus_per_node=2", "parallel.dp=2", "parallel.ep=2")
    plan = make_plan(compose_cfg(*over))
    assert plan.comm.all_to_all_calls == 5 * 12 * plan.grad_accum
    a2a, dp = plan.comm.parts["moe_all_to_all"]["intra"], plan.comm.parts["dp"]["intra"]
    assert a2a == 4 * 12 * (4 * 4096) * 2 * 2048 * 2 // 2  # exchanges x layers x tokens x top-2 x H x bf16 x (ep-1)/ep
    expected = a2a / (0.66 * 450e9) + dp / 450e9 + 60 * 113e-6
    assert plan.time.comm_seconds == pytest.approx(expected, rel=1e-9)
    # an ideal network: the plain bytes-over-bandwidth model
    ideal = make_plan(compose_cfg(*over, "cluster.all_to_all_efficiency=1.0", "cluster.collective_latency_us=0"))
    assert ideal.time.comm_seconds == pytest.approx((a2a + dp) / 450e9, rel=1e-9)
    # one GPU: no all-to-all
    assert make_plan(compose_cfg("recipe=mixtral_h200")).comm.all_to_all_calls == 0


@pytest.mark.parametrize("override,message", [
    ("cluster.all_to_all_efficiency=0", "cluster.all_to_all_efficiency=0.0 must be in (0, 1]"),
    ("cluster.all_to_all_efficiency=1.5", "cluster.all_to_all_efficiency=1.5 must be in (0, 1]"),
    ("cluster.collective_latency_us=-1", "cluster.collective_latency_us=-1.0 must be >= 0"),
])
def test_bad_cluster_cost_figures_are_refused(compose_cfg, override, message) -> None:
    from hpframe.plan import PlanError

    with pytest.raises(PlanError, match=re.escape(message)):
        make_plan(compose_cfg("recipe=mixtral_debug", override))
