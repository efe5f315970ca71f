"""Engine equivalence on CPU (gloo, fp32): for a matrix of layouts (dp, tp, pp, ep and their products),
ZeRO 0/1/2 and the gpt/Mixtral/DeepSeek debug models, the losses (total, LM, aux), the global
pre-clip gradient norms of 3 optimizer steps equal a single-process run of the same global batch
(tests/dist/engine_cases.py::reference) within 1e-5 relative, and every local parameter after them
equals its slice of the reference's: at most 0.001 of the entries more than 1e-3 lr away, none more
than 0.25 lr away. (Parameters are compared in units of lr: AdamW turns fp32 rounding noise on the
few gradient entries near its eps into visible moves of those entries -- measured: ~2e-5 of the
entries, at most 0.07 lr -- while the gradients themselves agree to ~5e-7. A wrong reduction or
shard moves most entries by whole lr steps and shows in the norms.)
One launch per world size runs all of its cases one after the other."""

from __future__ import annotations

import pytest

from engine_cases import Case, reference, run_case_on_rank
from hpframe.testing.distributed import run_distributed

pytestmark = pytest.mark.dist
TOL = 1e-5
PARAM_TOL_LR_STEPS = 0.25
PARAM_TOL_FRAC_OFF = 1e-3


def _worker(rank: int, world_size: int, jobs: list) -> list[dict]:
    from hpframe.engine.ds_env import prepare_deepspeed

    prepare_deepspeed()
    return [run_case_on_rank(rank, cfg, world_size, expected) for cfg, expected in jobs]


def _run(world_size: int, cases: list[tuple[Case, list[int]]], timeout: float) -> None:
    jobs, names = [], []
    for case, zeros in cases:
        expected = None
        for zero in zeros:
            cfg = case.cfg(zero)
            if expected is None:
                expected = reference(cfg, cfg.parallel.dp if cfg.parallel.dp > 0 else world_size // (cfg.parallel.tp * cfg.parallel.pp))
                assert min(expected["norm"]) > cfg.train.grad_clip, "clipping must be active in every step"
            jobs.append((cfg, expected))
            names.append(f"{case.name}/zero{zero}")
    results = run_distributed(_worker, world_size, (jobs,), timeout=timeout)
    failures = []
    for rank, per_rank in enumerate(results):
        for name, d in zip(names, per_rank):
            bad = {k: d[k] for k in ("loss", "lm", "aux", "norm", "eval") if d[k] > TOL}
            if d["bias"] > 1e-7:
                bad["bias"] = d["bias"]
            if d["params_in_lr_steps"] > PARAM_TOL_LR_STEPS or d["frac_off"] > PARAM_TOL_FRAC_OFF:
                bad["params"] = (d["params_in_lr_steps"], d["frac_off"])
            if bad or d["skipped"]:
                failures.append(f"rank {rank} {name}: {bad} worst param {d['params_worst']} skipped={d['skipped']}")
    assert not failures, "\n".join(failures)


WORLD2 = [
    (Case("dp2-mixtral", "mixtral_debug", ["parallel.dp=2"]), [0, 1, 2]),
    (Case("pp2-gpt-tied", "gpt_debug", ["parallel.pp=2", "parallel.dp=1"]), [0, 1]),
    (Case("pp2-mixtral", "mixtral_debug", ["parallel.pp=2", "parallel.dp=1"]), [1]),
    (Case("pp2-deepseek", "deepseek_debug", ["parallel.pp=2", "parallel.dp=1"]), [0]),
    (Case("ep2-mixtral", "mixtral_debug", ["parallel.dp=2", "parallel.ep=2"]), [0, 2]),  # ZeRO 1: see WORLD4
    (Case("ep2-deepseek", "deepseek_debug", ["parallel.dp=2", "parallel.ep=2"]), [2]),
    (Case("tp2-mixtral", "mixtral_debug", ["parallel.tp=2", "parallel.dp=1"]), [1]),
    (Case("tp2-deepseek", "deepseek_debug", ["parallel.tp=2", "parallel.dp=1"]), [0]),
    (Case("tp2-sp-mixtral", "mixtral_debug", ["parallel.tp=2", "parallel.dp=1", "parallel.sequence_parallel=true"]), [1]),
    (Case("pp2-recompute-deepseek", "deepseek_debug", ["parallel.pp=2", "parallel.dp=1", "parallel.recompute=full"]), [1]),
]

WORLD4 = [
    (Case("dp2xep2-mixtral", "mixtral_debug", ["parallel.dp=4", "parallel.ep=2"]), [0, 1, 2]),
    (Case("dp2xep2-deepseek", "deepseek_debug", ["parallel.dp=4", "parallel.ep=2"]), [1]),
    (Case("tp2xep2-mixtral", "mixtral_debug", ["parallel.tp=2", "parallel.dp=2", "parallel.ep=2"]), [2]),
    (Case("tp2xep2-deepseek", "deepseek_debug", ["parallel.tp=2", "parallel.dp=2", "parallel.ep=2"]), [0]),
    (Case("pp2xdp2-mixtral", "mixtral_debug", ["parallel.pp=2", "parallel.dp=2"]), [0, 1]),
    (Case("pp2xdp2-gpt-tied", "gpt_debug", ["parallel.pp=2", "parallel.dp=2"]), [1]),
    (Case("tp2xpp2-mixtral", "mixtral_debug", ["parallel.tp=2", "parallel.pp=2", "parallel.dp=1"]), [1]),
    (Case("tp2xpp2-gpt-tied", "gpt_debug", ["parallel.tp=2", "parallel.pp=2", "parallel.dp=1"]), [0]),
    (Case("pp2xep2-deepseek", "deepseek_debug", ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2"]), [1]),
]

WORLD8 = [
    (Case("tp2xpp2xdp2-mixtral", "mixtral_debug", ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2"]), [1]),
    (Case("tp2xpp2xdp2xep2-deepseek", "deepseek_debug", ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2"]), [0]),
]


def test_world2_dp_pp_ep_tp() -> None:
    _run(2, WORLD2, timeout=300)


def test_world4_products() -> None:
    _run(4, WORLD4, timeout=420)


@pytest.mark.slow
def test_world8_tp_pp_dp() -> None:
    _run(8, WORLD8, timeout=600)
