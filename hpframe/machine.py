"""Where a run runs: the machine against the plan, before anything is built.

* ``resolve_device``: cpu or cuda from ``train.device`` (auto = cuda when the machine has one); the
  only place that decides it, and that refuses ``train.device=cuda`` without a CUDA GPU.
* ``check_placement``: a plan for a GPU cluster on a machine without GPUs is refused unless
  ``train.device=cpu`` asks for the CPU explicitly (then a warning); more local processes than the
  machine has GPUs are refused, and on the CPU more than ``MAX_PROCS_PER_CORE`` processes per core
  (more than one per core only warns: the multi-process CPU tests and examples oversubscribe a small
  machine on purpose).
* ``resolve_num_threads``: intra-op threads of a process (``train.num_threads``; 0 = automatic).
* ``check_device_memory``: the plan's memory estimate for this rank against the device's real free
  memory; refused with both numbers and the keys that would make it fit (``plan.suggest.fitting_keys``).
* ``describe_oom``: one paragraph for a CUDA out-of-memory error during training.

The decisions are pure functions of numbers (tests inject them); ``probe`` reads the real machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hpframe.config.schema import Device, RunConfig
from hpframe.errors import UserError
from hpframe.plan.suggest import fit_hint, fitting_keys

GIB = 1 << 30
MAX_PROCS_PER_CORE = 4
"""CPU runs: refused above this many processes per core (each process needs a share of a core to progress)."""


@dataclass(frozen=True, slots=True)
class Machine:
    """What this machine offers: CUDA devices, CPU cores available to the process, 1-minute load average."""

    cuda_devices: int
    cpu_cores: int
    load: float = 0.0


def probe() -> Machine:
    """The real machine (imports torch)."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return Machine(cuda_devices=torch.cuda.device_count() if torch.cuda.is_available() else 0, cpu_cores=cores, load=load)


def resolve_device(cfg: RunConfig, machine: Machine) -> str:
    """``cpu`` or ``cuda``: train.device, with auto = cuda when the machine has a CUDA GPU.

    The one place that decides the device; train.device=cuda on a machine without a CUDA GPU is
    refused here (UserError naming train.device) rather than failing later inside torch or DeepSpeed.
    """
    if cfg.train.device == Device.cuda and machine.cuda_devices == 0:
        raise UserError("train.device=cuda but this machine has no CUDA GPU; set train.device=cpu or auto",
                        key="train.device", values={"cuda_devices": 0})
    if cfg.train.device == Device.auto:
        return Device.cuda.value if machine.cuda_devices > 0 else Device.cpu.value
    return Device(cfg.train.device).value


def runs_on_cuda(cfg: RunConfig, machine: Machine) -> bool:
    """Whether the run uses a CUDA device (``resolve_device``)."""
    return resolve_device(cfg, machine) == Device.cuda.value


def check_placement(cfg: RunConfig, machine: Machine, local_procs: int) -> list[str]:
    """Refuse (UserError) a plan this machine cannot run; return warnings for one it runs badly."""
    warnings: list[str] = []
    cluster = f"cluster={cfg.cluster.name} (cluster.device={cfg.cluster.device.value})"
    on_cuda = runs_on_cuda(cfg, machine)  # refuses train.device=cuda without a CUDA GPU
    if machine.cuda_devices == 0 and cfg.cluster.device == Device.cuda:
        if cfg.train.device != Device.cpu:
            raise UserError(
                f"{cluster} plans for GPUs, but this machine has no CUDA GPU: refusing to train on the CPU instead; "
                "pick a CPU plan (cluster=cpu, or a *_debug recipe), look at the plan with plan.dry_run=true, "
                "or set train.device=cpu to train this plan on the CPU anyway",
                key="cluster.device, train.device", values={"cuda_devices": 0})
        warnings.append(f"{cluster} plans for GPUs; training on the CPU as train.device=cpu asks (slow)")
    if on_cuda:
        if local_procs > machine.cuda_devices:
            raise UserError(
                f"the plan needs {local_procs} processes on this machine, one per GPU, but it has "
                f"{machine.cuda_devices} CUDA GPU(s); lower parallel.tp/pp/dp, start each node with torchrun, "
                "or set train.device=cpu",
                key="parallel.tp, parallel.pp, parallel.dp", values={"local_procs": local_procs, "cuda_devices": machine.cuda_devices})
        return warnings
    if local_procs > MAX_PROCS_PER_CORE * machine.cpu_cores:
        raise UserError(
            f"the plan needs {local_procs} processes on this machine's {machine.cpu_cores} CPU core(s), more than "
            f"{MAX_PROCS_PER_CORE} per core; lower parallel.tp/pp/dp (world size = tp*pp*dp)",
            key="parallel.tp, parallel.pp, parallel.dp", values={"local_procs": local_procs, "cpu_cores": machine.cpu_cores})
    if local_procs > machine.cpu_cores:
        warnings.append(f"{local_procs} processes share {machine.cpu_cores} CPU core(s): each step waits on the others")
    return warnings


def resolve_num_threads(requested: int, machine: Machine, *, local_procs: int, env_threads: str | None) -> int:
    """Intra-op threads per process.

    ``requested`` > 0 (``train.num_threads``) wins; else OMP_NUM_THREADS when set; else the cores
    left free by the load average and the other local processes, and 1 when fewer than 2 are free
    (on a loaded 2-core machine torch's default of one thread per core made steps ~40x slower).
    """
    if requested < 0:
        raise UserError(f"train.num_threads={requested} must be >= 0 (0 = automatic)", key="train.num_threads",
                        values={"train.num_threads": requested})
    if requested:
        return requested
    if env_threads and env_threads.isdigit() and int(env_threads) > 0:
        return int(env_threads)
    free = (machine.cpu_cores - machine.load) / max(local_procs, 1)
    return 1 if free < 2 else int(free)


def _fit_hint(cfg: RunConfig, capacity_bytes: int, world_size: int) -> str:
    return fit_hint(fitting_keys(cfg, capacity_bytes, world_size))


def check_device_memory(cfg: RunConfig, plan: Any, *, estimate_bytes: int, free_bytes: int, total_bytes: int,
                        device_name: str) -> str | None:
    """Refuse a plan whose memory estimate for this rank exceeds the device's free memory.

    With ``plan.memory_check=false`` the refusal becomes the returned warning. Returns None when it fits.
    """
    if estimate_bytes <= free_bytes:
        return None
    msg = (f"the plan needs {estimate_bytes / GIB:.1f} GiB per GPU, but {device_name} has {free_bytes / GIB:.1f} GiB free "
           f"of {total_bytes / GIB:.1f} GiB (cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g} assumes more); "
           + _fit_hint(cfg, free_bytes, plan.world_size))
    if not cfg.plan.memory_check:
        return msg + "; going on as plan.memory_check=false asks"
    raise UserError(msg, key="cluster.gpu_memory_gb, plan.memory_check",
                    values={"estimate_bytes": estimate_bytes, "free_bytes": free_bytes, "total_bytes": total_bytes})


def describe_oom(cfg: RunConfig, plan: Any, *, estimate_bytes: int, peak_bytes: int, total_bytes: int, device_name: str) -> str:
    """One paragraph for a CUDA out-of-memory error during training: estimate, measured peak, the keys that fit."""
    # the run needed more than the device holds (and at least the measured peak): the estimate fell short by
    # that ratio at least, so plan against the capacity scaled by it, with 5% headroom for fragmentation
    capacity = int(0.95 * total_bytes * estimate_bytes / max(peak_bytes, total_bytes, 1))
    return (f"hpframe: out of GPU memory on {device_name} ({total_bytes / GIB:.1f} GiB): the plan estimated "
            f"{estimate_bytes / GIB:.1f} GiB per GPU, the measured peak before the failure was {peak_bytes / GIB:.1f} GiB. "
            + _fit_hint(cfg, capacity, plan.world_size) + ".")


def prepare_process(cfg: RunConfig, *, local_procs: int, machine: Machine | None = None) -> tuple[str, list[str]]:
    """Check placement and set this process's thread count; return (where-it-runs line, warnings)."""
    import torch

    machine = machine or probe()
    warnings = check_placement(cfg, machine, local_procs)
    threads = resolve_num_threads(cfg.train.num_threads, machine, local_procs=local_procs,
                                  env_threads=os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(threads)
    if runs_on_cuda(cfg, machine):
        index = torch.cuda.current_device()
        where = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    else:
        where = f"cpu ({machine.cpu_cores} cores, load {machine.load:.1f})"
    line = (f"device {where}, dtype {cfg.train.dtype.value}, {threads} thread(s) per process, "
            f"{local_procs} process(es) on this machine")
    return line, warnings


def check_memory_now(cfg: RunConfig, plan: Any, rank: int) -> str | None:
    """``check_device_memory`` for this rank's stage against the current CUDA device's free memory; None off CUDA."""
    import torch

    if plan.memory is None or cfg.train.device == Device.cpu or not torch.cuda.is_available():
        return None
    stage = plan.ranks.coords(rank)["pp"]
    free, total = torch.cuda.mem_get_info()
    index = torch.cuda.current_device()
    return check_device_memory(cfg, plan, estimate_bytes=plan.memory.per_stage_total[stage], free_bytes=free,
                               total_bytes=total, device_name=f"cuda:{index} ({torch.cuda.get_device_name(index)})")


def oom_report(cfg: RunConfig, plan: Any, rank: int) -> str:
    """``describe_oom`` with this rank's estimate and the measured peak of the current CUDA device."""
    import torch

    index = torch.cuda.current_device()
    estimate = plan.memory.per_stage_total[plan.ranks.coords(rank)["pp"]] if plan.memory is not None else 0
    return describe_oom(cfg, plan, estimate_bytes=estimate, peak_bytes=torch.cuda.max_memory_allocated(),
                        total_bytes=torch.cuda.get_device_properties(index).total_memory,
                        device_name=f"cuda:{index} ({torch.cuda.get_device_name(index)})")
