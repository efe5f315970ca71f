"""Process-level DeepSpeed setup: accelerator choice, extension cache, and no shared-memory op build.

DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce op with gcc the first
time a process starts (tens of seconds per cold start; docs/performance.md, section 12). That op only
serves inference-style all-reduce; training collectives go through torch.distributed (gloo), so
``prepare_deepspeed`` replaces the builder with one that returns None, which DeepSpeed already
treats as "op not available". Call it before ``deepspeed.comm.init_distributed``.
"""

from __future__ import annotations

import os
from pathlib import Path

def _default_extensions_dir() -> Path:
    """The project's ``.cache/torch_extensions`` (git-ignored) in a source checkout, else ~/.cache/hpframe."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists() and os.access(repo, os.W_OK):
        return repo / ".cache" / "torch_extensions"
    return Path.home() / ".cache" / "hpframe" / "torch_extensions"


def _no_shm_op() -> None:
    return None


def set_environment(*, cuda: bool | None = None) -> None:
    """DS_ACCELERATOR=cpu without CUDA and a default TORCH_EXTENSIONS_DIR; imports no DeepSpeed.

    Called before DeepSpeed is first imported (hpframe.engine's __init__), so its accelerator
    detection reads the variable instead of guessing and warning on every process.
    """
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_default_extensions_dir()))


def prepare_deepspeed(*, cuda: bool | None = None) -> None:
    """Set DS_ACCELERATOR=cpu without CUDA, default TORCH_EXTENSIONS_DIR, and skip the shm op build.

    Idempotent. ``cuda`` defaults to ``torch.cuda.is_available()``.
    """
    set_environment(cuda=cuda)
    import importlib

    # importlib, not "import deepspeed.comm.torch as m": deepspeed.comm re-exports the torch package
    # under the same attribute name, so the import statement would bind the real torch module.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = _no_shm_op


def init_deepspeed_comm() -> None:
    """Attach DeepSpeed's communication layer to the already-initialized torch.distributed group."""
    import deepspeed.comm as ds_dist
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("initialize torch.distributed (hpframe.parallel.init_distributed) before DeepSpeed")
    prepare_deepspeed()
    ds_dist.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
