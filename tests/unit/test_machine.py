"""Where a run runs, decided from injected machine numbers (no GPU needed): GPU plans on a machine
without GPUs, local processes against GPUs and cores, the thread count, the plan's memory estimate
against a device's free memory (with the keys that would make it fit) and the out-of-memory paragraph.
The same checks on a real GPU: tests/gpu/test_device_memory.py."""

from __future__ import annotations

import pytest

from hpframe.errors import UserError
from hpframe.machine import (GIB, MAX_PROCS_PER_CORE, Machine, check_device_memory, check_placement, describe_oom,
                             resolve_device, resolve_num_threads)
from hpframe.plan import make_plan
from hpframe.plan.suggest import fitting_keys

LAPTOP = Machine(cuda_devices=0, cpu_cores=8, load=0.0)
ONE_GPU = Machine(cuda_devices=1, cpu_cores=16, load=0.0)


def test_gpu_plan_without_gpu_refused_unless_cpu_is_explicit(compose_cfg) -> None:
    cfg = compose_cfg("recipe=mixtral_h200")
    with pytest.raises(UserError, match=r"cluster=h200x1 \(cluster.device=cuda\) plans for GPUs, but this machine has no CUDA GPU") as info:
        check_placement(cfg, LAPTOP, 1)
    assert "train.device=cpu" in str(info.value) and info.value.key == "cluster.device, train.device"
    cfg = compose_cfg("recipe=mixtral_h200", "train.device=cpu")
    assert check_placement(cfg, LAPTOP, 1) == ["cluster=h200x1 (cluster.device=cuda) plans for GPUs; training on the CPU "
                                               "as train.device=cpu asks (slow)"]
    assert check_placement(cfg, ONE_GPU, 1) == []


def test_more_processes_than_gpus_or_cores_refused(compose_cfg) -> None:
    cfg = compose_cfg("recipe=mixtral_8x7b", "cluster=h200x8", "parallel.tp=1", "parallel.pp=2", "parallel.ep=4")
    with pytest.raises(UserError, match="the plan needs 8 processes on this machine, one per GPU, but it has 1 CUDA GPU") as info:
        check_placement(cfg, ONE_GPU, 8)
    assert info.value.values == {"local_procs": 8, "cuda_devices": 1}
    cpu = compose_cfg("recipe=mixtral_8x7b", "train.device=cpu")  # 64 processes
    with pytest.raises(UserError, match=f"the plan needs 64 processes on this machine's 8 CPU core\\(s\\), more than {MAX_PROCS_PER_CORE} per core"):
        check_placement(cpu, LAPTOP, 64)
    debug = compose_cfg("recipe=gpt_debug", "parallel=tp2_pp2_dp2")  # 8 processes on 2 cores: oversubscribed on purpose
    assert check_placement(debug, Machine(0, 2), 8) == ["8 processes share 2 CPU core(s): each step waits on the others"]
    assert check_placement(debug, Machine(0, 8), 8) == []
    with pytest.raises(UserError, match="train.device=cuda but this machine has no CUDA GPU"):
        check_placement(compose_cfg("train.device=cuda"), LAPTOP, 1)


@pytest.mark.parametrize("device, machine, expected", [
    ("auto", LAPTOP, "cpu"), ("auto", ONE_GPU, "cuda"), ("cpu", ONE_GPU, "cpu"), ("cuda", ONE_GPU, "cuda"),
])
def test_resolve_device(compose_cfg, device: str, machine: Machine, expected: str) -> None:
    assert resolve_device(compose_cfg(f"train.device={device}"), machine) == expected


def test_resolve_device_cuda_without_gpu_refused(compose_cfg) -> None:
    """The refusal build_engine and check_placement share: it names the key and the device count."""
    with pytest.raises(UserError, match=r"^train.device=cuda but this machine has no CUDA GPU; set train.device=cpu or auto") as info:
        resolve_device(compose_cfg("train.device=cuda"), LAPTOP)
    assert info.value.key == "train.device" and info.value.values == {"cuda_devices": 0}


@pytest.mark.parametrize("requested, machine, procs, env, expected", [
    (0, Machine(0, 2, load=6.0), 1, None, 1),   # loaded 2-core machine: one thread
    (0, Machine(0, 2, load=0.0), 1, None, 2),   # idle: both cores
    (0, Machine(0, 16, load=2.0), 2, None, 7),  # 14 free cores over 2 processes
    (0, Machine(0, 16, load=0.0), 1, "3", 3),   # OMP_NUM_THREADS set by the user
    (5, Machine(0, 2, load=6.0), 1, "3", 5),    # train.num_threads wins
])
def test_num_threads(requested: int, machine: Machine, procs: int, env: str | None, expected: int) -> None:
    assert resolve_num_threads(requested, machine, local_procs=procs, env_threads=env) == expected


def test_num_threads_negative_refused() -> None:
    with pytest.raises(UserError, match=r"train.num_threads=-1 must be >= 0"):
        resolve_num_threads(-1, LAPTOP, local_procs=1, env_threads=None)


def test_device_memory_refused_with_numbers_and_fitting_keys(compose_cfg) -> None:
    """mixtral_h200 with fp32 master weights plans 87.9 GiB; an 80 GB H100 has about 79 GiB."""
    cfg = compose_cfg("recipe=mixtral_h200")
    plan = make_plan(cfg)
    estimate = plan.memory.total
    assert round(estimate / GIB, 1) == 87.9
    free, total = int(78.6 * GIB), int(79.2 * GIB)
    with pytest.raises(UserError) as info:
        check_device_memory(cfg, plan, estimate_bytes=estimate, free_bytes=free, total_bytes=total, device_name="cuda:0 (H100)")
    msg = str(info.value)
    assert msg.startswith("the plan needs 87.9 GiB per GPU, but cuda:0 (H100) has 78.6 GiB free of 79.2 GiB "
                          "(cluster.gpu_memory_gb=139 assumes more); settings that fit: ")
    assert info.value.values == {"estimate_bytes": estimate, "free_bytes": free, "total_bytes": total}
    keys = fitting_keys(cfg, free, plan.world_size)
    assert keys and all(k in msg for k in keys)
    for option in keys:  # every suggestion really fits the device under the planner
        fitted = compose_cfg("recipe=mixtral_h200", *option.split(), "cluster.gpu_memory_gb=78.6")
        assert make_plan(fitted).memory.total <= free
    assert check_device_memory(cfg, plan, estimate_bytes=estimate, free_bytes=int(130 * GIB), total_bytes=int(139 * GIB),
                               device_name="cuda:0") is None
    lenient = compose_cfg("recipe=mixtral_h200", "plan.memory_check=false")
    warning = check_device_memory(lenient, plan, estimate_bytes=estimate, free_bytes=free, total_bytes=total, device_name="cuda:0")
    assert warning is not None and warning.endswith("going on as plan.memory_check=false asks")


def test_oom_paragraph(compose_cfg) -> None:
    cfg = compose_cfg("recipe=mixtral_h200", "train.master_dtype=bf16", "parallel.zero_stage=0")
    plan = make_plan(cfg)
    text = describe_oom(cfg, plan, estimate_bytes=int(47.9 * GIB), peak_bytes=int(78.0 * GIB), total_bytes=int(79.2 * GIB),
                        device_name="cuda:0 (H100)")
    assert text.startswith("hpframe: out of GPU memory on cuda:0 (H100) (79.2 GiB): the plan estimated 47.9 GiB per GPU, "
                           "the measured peak before the failure was 78.0 GiB. ")
    assert "\n" not in text and "settings that fit: parallel.recompute=selective" in text


def test_prepare_process_sets_threads_and_names_where_it_runs(compose_cfg, monkeypatch) -> None:
    import torch

    from hpframe.machine import prepare_process

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        line, warnings = prepare_process(compose_cfg("train.device=cpu"), local_procs=1, machine=Machine(0, 2, load=6.0))
        assert torch.get_num_threads() == 1
        assert line == "device cpu (2 cores, load 6.0), dtype fp32, 1 thread(s) per process, 1 process(es) on this machine"
        assert warnings == []
        line, _ = prepare_process(compose_cfg("train.device=cpu", "train.num_threads=2"), local_procs=1, machine=Machine(0, 2, load=6.0))
        assert torch.get_num_threads() == 2 and ", 2 thread(s) per process," in line
    finally:
        torch.set_num_threads(before)


def test_gpu_recipe_on_this_cpu_machine_starts_nothing(compose_cfg, capsys) -> None:
    """``launch.py recipe=mixtral_8x7b`` (64 processes on h200x64) is refused before any process starts."""
    import torch

    from hpframe.run import main

    if torch.cuda.is_available():
        pytest.skip("checks a machine without GPUs")
    assert main(compose_cfg("recipe=mixtral_8x7b")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hpframe: invalid configuration: cluster=h200x64 (cluster.device=cuda) plans for GPUs, but this machine "
                   "has no CUDA GPU: refusing to train on the CPU instead; pick a CPU plan (cluster=cpu, or a *_debug recipe), "
                   "look at the plan with plan.dry_run=true, or set train.device=cpu to train this plan on the CPU anyway"]
