"""Restarts under torchrun: which attempt this is, and a rendezvous store that forgets earlier attempts.

torchrun (``--max-restarts``) restarts every worker after one fails. Its workers share the agent's
TCPStore (``TORCHELASTIC_USE_AGENT_STORE=True``), and with torch 2.13 that store keeps the keys of the
failed attempt: a restarted rank that reaches ``init_process_group`` before rank 0 reads rank 0's
gloo address of the dead attempt and fails with "Connection refused" (measured here: rank 0 slower
by 3 s is enough). ``attempt_store`` prefixes every key with the attempt number, so each attempt meets
only its own ranks.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def attempt_store(world_size: int, *, timeout_s: float = 1800.0) -> Any | None:
    """A store for ``init_process_group`` scoped to this torchrun attempt; None outside torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    # a client of the agent's store, as torch's env:// rendezvous would create, plus the attempt prefix
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                         timeout=timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"hpframe/attempt_{restart_count()}", base)
