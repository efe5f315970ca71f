"""Pipeline partition: contiguous transformer blocks per stage, balanced by cost or set by hand.

Cost of a block = its forward FLOPs per token (active matmul weights and attention scores), so dense
and MoE blocks weigh differently. The head costs its matmul (2*V*H per token) on the last stage. The
embedding has no matmul but carries as much weight, gradient and optimizer state as the head; it is
counted at half the head's cost on the first stage. The partition minimises the largest stage cost
(exact dynamic programme over split points), every stage gets at least one block and no block is
dropped, whatever num_layers % pp is.
"""

from __future__ import annotations

from hpframe.config.schema import ModelConfig, MoEConfig
from hpframe.plan.errors import PlanError
from hpframe.plan.params import block_fwd_flops, head_fwd_flops
from hpframe.plan.types import PipelinePlan, StagePlan


def stage_costs(m: ModelConfig, moe: MoEConfig, seq_len: int) -> tuple[float, tuple[float, ...], float]:
    """(embedding cost, per-block costs, head cost), in forward FLOPs per token."""
    head = float(head_fwd_flops(m))
    blocks = tuple(float(block_fwd_flops(m, moe, i, seq_len)) for i in range(m.num_layers))
    return head / 2, blocks, head


def balance(blocks: tuple[float, ...], pp: int, *, first_extra: float = 0.0, last_extra: float = 0.0) -> tuple[int, ...]:
    """Blocks per stage (length pp, each >= 1, summing to len(blocks)) minimising the largest stage cost.

    ``first_extra``/``last_extra`` are added to the first/last stage (embedding, head).
    """
    n = len(blocks)
    assert 1 <= pp <= n, "checked by the planner: 1 <= pp <= num_layers"
    prefix = [0.0]
    for c in blocks:
        prefix.append(prefix[-1] + c)

    def cost(s: int, i: int, j: int) -> float:  # stage s runs blocks i..j-1
        return prefix[j] - prefix[i] + (first_extra if s == 0 else 0.0) + (last_extra if s == pp - 1 else 0.0)

    inf = float("inf")
    # best[s][j]: smallest max-cost placing blocks 0..j-1 on stages 0..s; cut[s][j]: start of stage s.
    best = [[inf] * (n + 1) for _ in range(pp)]
    cut = [[0] * (n + 1) for _ in range(pp)]
    for j in range(1, n - pp + 2):
        best[0][j] = cost(0, 0, j)
    for s in range(1, pp):
        for j in range(s + 1, n - (pp - 1 - s) + 1):
            for i in range(s, j):
                v = max(best[s - 1][i], cost(s, i, j))
                # ties: prefer the later cut, which keeps earlier stages (more micro-batches in flight) lighter
                if v <= best[s][j]:
                    best[s][j], cut[s][j] = v, i
    sizes, j = [], n
    for s in range(pp - 1, 0, -1):
        i = cut[s][j]
        sizes.append(j - i)
        j = i
    sizes.append(j)
    return tuple(reversed(sizes))


def make_pipeline(m: ModelConfig, moe: MoEConfig, pp: int, layout: list[int], seq_len: int) -> PipelinePlan:
    """Partition ``m.num_layers`` blocks over ``pp`` stages (``layout`` = parallel.pipeline_layout, may be empty)."""
    n = m.num_layers
    if pp > n:
        raise PlanError(
            f"parallel.pp={pp} exceeds model.num_layers={n}: every pipeline stage needs at least one block",
            key="parallel.pp, model.num_layers",
            values={"parallel.pp": pp, "model.num_layers": n},
        )
    emb, blocks, head = stage_costs(m, moe, seq_len)
    if layout:
        lay = list(layout)
        if len(lay) != pp or sum(lay) != n or min(lay) < 1:
            raise PlanError(
                f"parallel.pipeline_layout={lay} must have parallel.pp={pp} entries, each >= 1, summing to "
                f"model.num_layers={n} (it has {len(lay)} entries summing to {sum(lay)})",
                key="parallel.pipeline_layout",
                values={"parallel.pipeline_layout": lay, "parallel.pp": pp, "model.num_layers": n},
            )
        sizes = tuple(lay)
    else:
        sizes = balance(blocks, pp, first_extra=emb, last_extra=head)
    stages, start = [], 0
    for s, k in enumerate(sizes):
        layers = tuple(range(start, start + k))
        c = sum(blocks[i] for i in layers) + (emb if s == 0 else 0.0) + (head if s == pp - 1 else 0.0)
        stages.append(StagePlan(index=s, layers=layers, has_embedding=s == 0, has_head=s == pp - 1, cost=c))
        start += k
    assert start == n
    return PipelinePlan(stages=tuple(stages), manual=bool(layout))
