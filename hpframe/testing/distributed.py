"""Run a function on N CPU processes with a gloo process group, collect each rank's result.

Used by the multi-process tests: ``results = run_distributed(fn, world_size, args, timeout=120)``.
``fn(rank, world_size, *args)`` runs inside an initialized gloo group and returns any
``torch.save``-able object; the call returns the list of results ordered by rank. A rank that raises
fails the call with that rank's traceback; a run that exceeds ``timeout`` kills every process and
raises ``TimeoutError`` (gloo collectives that never match would otherwise hang forever).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # report any failure of this rank to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, args: tuple = (), *, timeout: float = 180.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo processes; return results by rank."""
    import torch

    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hpframe-dist-") as out_dir:
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, out_dir, args)) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [i for i, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results: list[Any] = []
        errors: list[str] = []
        for r in range(world_size):
            f = Path(out_dir) / f"rank{r}.pt"
            if not f.exists():
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode})")
                continue
            rec = torch.load(f, weights_only=False)  # written by our own workers just now
            if rec["ok"]:
                results.append(rec["result"])
            else:
                errors.append(f"rank {r} failed:\n{rec['error']}")
        if alive:
            raise TimeoutError(f"ranks {alive} still running after the timeout; killed. " + "\n".join(errors))
        if errors:
            raise RuntimeError("\n".join(errors))
        return results
