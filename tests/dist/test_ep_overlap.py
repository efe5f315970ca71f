"""parallel.ep_overlap: the shared experts computed during the dispatch all-to-all (2 gloo processes).

``ExpertParallelExperts.forward_with_side`` with overlap on starts the exchange, calls ``side()`` while
it is in flight (checked: the pending exchange exists when side runs) and returns the same rows, side
output and input/weight gradients as the blocking path (overlap off), bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from hpframe.testing.distributed import run_distributed


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from hpframe.config.schema import Activation
    from hpframe.models.moe import GroupedExperts
    from hpframe.parallel import expert as ep_mod

    torch.manual_seed(0)  # same full expert weights on both ranks
    full = GroupedExperts(4, 16, 24, Activation.swiglu)
    for w in (full.w13, full.w2):
        torch.nn.init.normal_(w, std=0.2)
    group = dist.new_group([0, 1])
    g = torch.Generator().manual_seed(100 + rank)
    counts = torch.tensor([3, 0, 5, 2]) if rank == 0 else torch.tensor([1, 4, 0, 6])
    x = torch.randn(int(counts.sum()), 16, generator=g)
    shared_w = torch.randn(16, 16, generator=g)
    out = {}
    started = []
    real_start = ep_mod._AllToAllStart.forward

    def spy(ctx, x_, out_splits, in_splits, grp, pending):
        res = real_start(ctx, x_, out_splits, in_splits, grp, pending)
        started.append(pending)
        return res

    ep_mod._AllToAllStart.forward = staticmethod(spy)
    for overlap in (True, False):
        ex = ep_mod.ExpertParallelExperts(full, global_expert_ids=range(2 * rank, 2 * rank + 2), ep_group=group,
                                          ep_size=2, overlap=overlap)
        xi = x.clone().requires_grad_()
        sw = shared_w.clone().requires_grad_()
        in_flight = []

        def side():
            in_flight.append(bool(started) and started[-1].work is not None)
            return xi[:4] @ sw

        y, s = ex.forward_with_side(xi, counts, side)
        (y.square().sum() + s.sum()).backward()
        out[overlap] = {"y": y.detach(), "s": s.detach(), "gx": xi.grad, "gsw": sw.grad,
                        "gw": [w.grad for w in (ex.w13, ex.w2)], "in_flight": in_flight}
        started.clear()
    return out


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_overlapped_dispatch_equals_blocking() -> None:
    for r in run_distributed(_worker, 2, timeout=100):
        on, off = r[True], r[False]
        assert on["in_flight"] == [True]  # side ran once, while the exchange was pending
        assert off["in_flight"] == [False]  # blocking path: no pending exchange
        for k in ("y", "s", "gx", "gsw"):
            assert torch.equal(on[k], off[k]), k
        for a, b in zip(on["gw"], off["gw"]):
            assert torch.equal(a, b)
