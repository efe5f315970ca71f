"""init_distributed(plan): start torch.distributed from the launcher's environment and build the groups.

Reads the variables torchrun and the DeepSpeed launcher both export (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). A single process started without a launcher (plan.world_size == 1) gets a
one-rank group on a free local port, so the same code path runs everywhere.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hpframe.checkpoint.restart import attempt_store
from hpframe.errors import UserError
from hpframe.parallel.groups import ParallelGroups, build_groups


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_backend() -> str:
    """nccl when CUDA is available, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def set_collective_timeout(timeout_s: float) -> timedelta:
    """Make ``timeout_s`` the timeout of the world group and of every group created later.

    torch gives ``new_group`` (ours and DeepSpeed's) its module default of 30 minutes unless a timeout
    is passed; replacing that default (``distributed_c10d.default_pg_timeout``, a private name, read at
    each group creation in torch 2.11-2.13) is the one place that covers groups created by libraries.
    """
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    return timeout


def init_distributed(plan: Any, *, backend: str | None = None, timeout_s: float | None = None) -> ParallelGroups:
    """Initialize torch.distributed (unless already initialized) and return this rank's ParallelGroups.

    ``backend`` defaults to nccl on GPUs (the CUDA device is set from LOCAL_RANK first) and gloo on
    CPUs. Raises ValueError when WORLD_SIZE (or an existing group's size) differs from
    ``plan.world_size``. ``timeout_s``: how long any collective waits for the other ranks (see
    ``set_collective_timeout``); None keeps torch's default.
    """
    backend = backend or default_backend()
    if dist.is_initialized():
        world_size = dist.get_world_size()
        if world_size != plan.world_size:
            raise ValueError(
                f"torch.distributed is initialized with world size {world_size}, "
                f"but the plan needs {plan.world_size} ranks (tp*pp*dp)"
            )
        return build_groups(plan)
    world_size = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    if world_size is None or rank is None:
        if plan.world_size != 1:
            raise UserError(
                f"WORLD_SIZE/RANK are not set but the plan needs {plan.world_size} ranks; "
                "start with torchrun or the deepspeed launcher"
            )
        world_size, rank = 1, 0
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if world_size != plan.world_size:
        raise UserError(f"WORLD_SIZE={world_size} but the plan needs {plan.world_size} ranks (tp*pp*dp)")
    local_rank = _env_int("LOCAL_RANK", 0)
    assert local_rank is not None
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise UserError("backend nccl needs CUDA, which is not available; use gloo on CPUs")
        torch.cuda.set_device(local_rank)
    # under torchrun a store scoped to this restart attempt (hpframe/checkpoint/restart.py); else env://
    timeout = set_collective_timeout(timeout_s) if timeout_s else None
    dist.init_process_group(backend, rank=rank, world_size=world_size, store=attempt_store(world_size), timeout=timeout)
    return build_groups(plan)
