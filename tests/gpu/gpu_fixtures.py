"""Fixtures shared by GPU tests (imported by the modules that use them)."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_gpu_process_group(monkeypatch: pytest.MonkeyPatch):
    """A one-rank environment for init_distributed, undone afterwards (later tests start launchers)."""
    import torch.distributed as dist

    from hpframe.testing.distributed import free_port

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
