"""Expert parallelism (all-to-all dispatch/combine) against the single-process model, on CPU in fp32.

Compared, as in the TP test: the data-parallel mean loss, each rank's logits, and the gradient of
every parameter (expert slices gathered over the EP group) with the unsharded model run on every
data-parallel rank's micro-batch. Layouts: ep2 (dp=2, 2 processes), dp2 x ep2 (dp=4, 4 processes),
tp2 x ep2 (4 processes); Mixtral-like and DeepSeek-V3-like debug models; dropless and with capacity;
uneven routing (router bias so some experts, and on ep2 a whole EP rank, receive no tokens).
Node-limited routing: 2 simulated nodes x 2 processes, ep=4, moe.max_nodes_per_token=1: every
token's experts sit on one node, and the rows each rank sends match the routing.
"""

from __future__ import annotations

import pytest
import torch

from _equivalence import case, check, worker
from hpframe.testing.distributed import run_distributed

EP2 = ["parallel.tp=1", "parallel.dp=2", "parallel.ep=2"]
DP2_EP2 = ["parallel.tp=1", "parallel.dp=4", "parallel.ep=2"]
TP2_EP2 = ["parallel.tp=2", "parallel.dp=2", "parallel.ep=2"]
CAPACITY = ["moe.dropless=false", "moe.capacity_factor=1.0", "moe.min_capacity=1"]
NODES2 = ["cluster.nodes=2", "cluster.gpus_per_node=2", "parallel.tp=1", "parallel.dp=4", "parallel.ep=4"]


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_ep2_matches_single_process() -> None:
    cases = [
        case("mixtral", "mixtral_debug", 2, EP2),
        case("mixtral_capacity", "mixtral_debug", 2, [*EP2, *CAPACITY]),
        # Experts 4..7 (all of EP rank 1) and 1 never chosen: rank 1 receives no rows at all.
        case("mixtral_starved_rank", "mixtral_debug", 2, EP2, starve=(1, 4, 5, 6, 7)),
        case("mixtral_starved_capacity", "mixtral_debug", 2, [*EP2, *CAPACITY], starve=(1, 4, 5, 6, 7)),
        case("mixtral_starved_rank_full_recompute", "mixtral_debug", 2, EP2, starve=(4, 5, 6, 7), recompute="full"),
        case("deepseek", "deepseek_debug", 2, EP2),  # shared expert overlapped with the dispatch (default)
        case("deepseek_no_overlap", "deepseek_debug", 2, [*EP2, "parallel.ep_overlap=false"]),
        case("deepseek_capacity_uneven", "deepseek_debug", 2, [*EP2, *CAPACITY], starve=(2, 3, 9)),
        case("deepseek_selective", "deepseek_debug", 2, EP2, recompute="selective"),
    ]
    results = run_distributed(worker, 2, (cases,), timeout=240)
    check(results)
    by_case = {r["case"]: (results[0][i], results[1][i]) for i, r in enumerate(results[0])}
    # A starved rank really received nothing, and its expert weights have zero (not None) gradients.
    r0, r1 = by_case["mixtral_starved_rank"]
    assert r1["rows_received"] == [0, 0] and min(r0["rows_received"]) > 0
    assert r1["expert_grad_abs"] and all(v == 0.0 for v in r1["expert_grad_abs"].values())
    assert all(v > 0.0 for v in r0["expert_grad_abs"].values())
    # Capacity really dropped assignments (so those cases differ from dropless), dropless none.
    for name in ("mixtral_capacity", "deepseek_capacity_uneven", "mixtral_starved_capacity"):
        assert max(by_case[name][0]["dropped_frac"]) > 0, (name, by_case[name][0]["dropped_frac"])
    assert by_case["mixtral"][0]["dropped_frac"] == [0.0, 0.0]


@pytest.mark.dist
@pytest.mark.timeout(300)
def test_four_process_ep_layouts_and_node_limited_routing() -> None:
    cases = [
        case("dp2xep2_mixtral", "mixtral_debug", 4, DP2_EP2),
        case("dp2xep2_deepseek_capacity", "deepseek_debug", 4, [*DP2_EP2, *CAPACITY], starve=(0, 5)),
        case("tp2xep2_mixtral", "mixtral_debug", 4, TP2_EP2, starve=(6,)),
        case("tp2xep2_mixtral_capacity_sp", "mixtral_debug", 4, [*TP2_EP2, *CAPACITY], sequence_parallel=True),
        case("tp2xep2_deepseek", "deepseek_debug", 4, TP2_EP2, recompute="full"),
        case("tp2xep2_deepseek_capacity", "deepseek_debug", 4, [*TP2_EP2, *CAPACITY], recompute="selective"),
        case("nodes2_limit1", "deepseek_debug", 4, [*NODES2, "moe.max_nodes_per_token=1"]),
        case("nodes2_unlimited", "deepseek_debug", 4, [*NODES2, "moe.max_nodes_per_token=0"]),
    ]
    results = run_distributed(worker, 4, (cases,), timeout=280)
    check(results)
    for rank_results in results:
        for r in rank_results:
            if not r["case"].startswith("nodes2"):
                continue
            node_of_ep = r["node_of_ep_rank"]
            assert node_of_ep == [0, 0, 1, 1], node_of_ep
            per_rank = r["experts_per_rank"]
            nodes_per_token = []
            for idx, sent in zip(r["topk_idx"], r["rows_sent"]):
                dest = idx // per_rank  # [T,k] destination EP rank of each assignment
                nodes = torch.tensor(node_of_ep)[dest]
                nodes_per_token.append((nodes != nodes[:, :1]).any(-1).long() + 1)
                # The rows this rank sent to each EP rank are exactly its routed assignments (dropless).
                assert sent == torch.bincount(dest.flatten(), minlength=4).tolist(), (r["case"], sent)
            most = int(torch.cat(nodes_per_token).max())
            if r["case"] == "nodes2_limit1":
                assert most == 1, f"rank {r['rank']}: a token reached {most} nodes with max_nodes_per_token=1"
            else:
                assert most == 2  # without the limit some tokens do span both nodes
