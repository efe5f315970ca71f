"""``train.profile_from_step``: torch.profiler over a few training steps, written to RUN_DIR/profile/.

Every rank writes, for steps ``first .. first + count - 1``:
  * ``rank<R>_ops.txt``     operators and kernels, sorted by self device time (self CPU time on CPUs);
  * ``rank<R>_phases.txt``  hpframe's own ranges per step (``hpframe/forward``, ``hpframe/backward``,
                            ``hpframe/optimizer``, ``hpframe/grad_norm``, ...), host and device time;
  * ``rank<R>_trace.json.gz`` the full timeline, for chrome://tracing or Perfetto; with
    ``train.profile_with_stack`` it also holds the Python function calls around every operator, so a
    kernel can be traced to the code that issued it.
The tables are divided by the number of profiled steps, so they read "per step".

The first steps of a run include compilation and allocator warm-up; profile after them (the default
``train.profile_num_steps=3`` starting at, say, step 6). Profiling adds host overhead of its own:
take step times from an unprofiled run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hpframe.logging import get_logger
from hpframe.phases import PHASE_PREFIX, phase  # noqa: F401  (phase: the ranges these tables group)

log = get_logger(__name__)

class StepProfiler:
    """Starts torch.profiler before step ``first`` and writes its tables after step ``first + count - 1``."""

    def __init__(self, run_dir: str | Path, *, first: int, count: int, rank: int, cuda: bool,
                 with_stack: bool = False) -> None:
        if first < 0:
            raise ValueError(f"train.profile_from_step={first} must be >= 0 (0 = off)")
        if first > 0 and count < 1:
            raise ValueError(f"train.profile_num_steps={count} must be >= 1")
        self.dir = Path(run_dir) / "profile"
        self.first, self.last, self.count = first, first + count - 1, count
        self.rank, self.cuda, self.with_stack = rank, cuda, with_stack
        self._prof: Any = None
        self.written: list[Path] = []

    @property
    def enabled(self) -> bool:
        return self.first > 0

    def before_step(self, step: int) -> None:
        if not self.enabled or step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._prof = torch.profiler.profile(activities=activities, with_stack=self.with_stack)
        self._prof.__enter__()

    def after_step(self, step: int) -> bool:
        """Stop and write the profile after its last step; True when it did (seconds of host work
        that the next step's time must not include)."""
        if self._prof is None or step != self.last:
            return False
        if self.cuda:
            torch.cuda.synchronize()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.written = self._write(prof)
        if self.rank == 0:
            log.info(f"profile of steps {self.first}-{self.last} written to {self.dir}")
        return True

    def close(self) -> None:
        """Stop a profile the run ended inside (fewer steps than asked): nothing is written."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
            log.warning(f"profile of steps {self.first}-{self.last}: the run ended at an earlier step, nothing written")

    def _write(self, prof: Any) -> list[Path]:
        self.dir.mkdir(parents=True, exist_ok=True)
        events = prof.key_averages()
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        header = f"# steps {self.first}-{self.last} ({self.count} steps); times are totals over them, divide by {self.count} per step\n"
        ops = self.dir / f"rank{self.rank}_ops.txt"
        ops.write_text(header + events.table(sort_by=sort, row_limit=60, max_name_column_width=70))
        written = [ops]
        phases = self.dir / f"rank{self.rank}_phases.txt"
        phases.write_text(header + phase_table(events, self.count))
        trace = self.dir / f"rank{self.rank}_trace.json.gz"
        prof.export_chrome_trace(str(trace))
        return [*written, phases, trace]


def phase_table(events: Any, steps: int) -> str:
    """Per-step host and device milliseconds of hpframe's named ranges, from ``key_averages()``."""
    rows = []
    for e in events:
        if e.key.startswith(PHASE_PREFIX):
            device_us = getattr(e, "device_time_total", 0.0) or 0.0
            rows.append((e.key, e.count / steps, e.cpu_time_total / steps / 1e3, device_us / steps / 1e3))
    rows.sort(key=lambda r: -r[2])
    lines = [f"{'range':<32}{'calls/step':>12}{'host ms/step':>14}{'device ms/step':>16}"]
    lines += [f"{k:<32}{c:>12.1f}{h:>14.2f}{d:>16.2f}" for k, c, h, d in rows]
    return "\n".join(lines) + "\n"
