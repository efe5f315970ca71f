"""PlanError: the one exception the planner raises for a configuration that cannot run (MemoryRefusal is one)."""

from __future__ import annotations

from typing import Any

from hpframe.errors import UserError


class PlanError(UserError):
    """An impossible or unsafe configuration, found before anything starts.

    ``key`` names the configuration key(s) at fault (comma-separated when several interact, e.g.
    ``"parallel.tp, model.num_heads"``); ``values`` maps those keys (and derived quantities) to the
    numbers involved, so callers and tests can check them without parsing the message.
    """

    def __init__(self, message: str, *, key: str, values: dict[str, Any] | None = None) -> None:
        super().__init__(message, key=key, values=values)


class MemoryRefusal(PlanError):
    """The plan's memory estimate per GPU exceeds ``cluster.gpu_memory_gb`` under ``plan.memory_check=true``.

    ``values`` also carries ``world_size`` and ``device_bytes``: ``make_plan`` searches that world size for
    settings that fit the device and re-raises the refusal with them (``settings_that_fit``).
    """
