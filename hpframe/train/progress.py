"""Rank 0's view of training: a rich progress bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
from typing import Any, Mapping

from hpframe.logging import get_logger

log = get_logger(__name__)


def format_record(record: Mapping[str, Any], total: int) -> str:
    """One line with the figures of a step record."""
    return (
        f"step {record['step']}/{total} | loss {record['loss']:.4f} | lm {record['lm_loss']:.4f} | "
        f"aux {record['aux_loss']:.4f} | lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | "
        f"{record['tokens_per_s']:,.0f} tok/s | mfu {100 * record['mfu']:.2f}% | "
        f"load cv {record['expert_load_cv']:.3f} | dropped {record['dropped_token_frac']:.3f}"
    )


def compact_record(record: Mapping[str, Any]) -> str:
    """The same figures, abbreviated for the progress bar."""
    return (
        f"loss {record['loss']:.3f} lm {record['lm_loss']:.3f} aux {record['aux_loss']:.3f} lr {record['lr']:.1e} "
        f"gn {record['grad_norm']:.2f} {record['tokens_per_s'] / 1000:.1f}k tok/s mfu {100 * record['mfu']:.1f}% "
        f"cv {record['expert_load_cv']:.2f} drop {record['dropped_token_frac']:.2f}"
    )


class Progress:
    """Shows step records: a bar when enabled and stdout is a terminal, else a log line per log step."""

    def __init__(self, *, total: int, start: int, enabled: bool, console: Any = None) -> None:
        """``console``: a rich Console to draw on (tests pass one of fixed width); default: stdout when a terminal."""
        self.total = total
        self.bar = None
        self.enabled = enabled
        if enabled and (console is not None or sys.stdout.isatty()):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
            from rich.table import Column

            # bar, step count and ETA keep their width; the figures take what is left of the line and wrap
            fixed = Column(no_wrap=True)
            self.bar = RichProgress(
                BarColumn(bar_width=20, table_column=Column(no_wrap=True, min_width=20)), MofNCompleteColumn(table_column=fixed),
                TimeRemainingColumn(table_column=Column(no_wrap=True)),
                TextColumn("{task.fields[figures]}", table_column=Column(ratio=1, overflow="fold")),
                transient=False, console=console,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, figures="")
            self.bar.start()

    def update(self, record: Mapping[str, Any], *, log_line: bool) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], figures=compact_record(record))
        elif log_line:
            log.info(format_record(record, self.total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
