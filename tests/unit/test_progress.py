"""The progress bar at 80 columns: the bar, the step count and the ETA stay whole on the first line;
the figures wrap below them (rendered on a recording rich Console of width 80). Before, rich gave the
whole width to the figures and dropped the bar, the step count and the ETA."""

from __future__ import annotations

import io
import re

from rich.console import Console

from hpframe.train.progress import Progress, compact_record

RECORD = dict(step=37, loss=7.12345, lm_loss=7.0, aux_loss=0.0412, lr=3e-4, grad_norm=1.234, tokens_per_s=123456.0,
              mfu=0.4567, expert_load_cv=0.123, dropped_token_frac=0.0)


def test_bar_step_and_eta_kept_at_80_columns() -> None:
    live = Console(width=80, file=io.StringIO(), force_terminal=True)
    bar = Progress(total=100, start=0, enabled=True, console=live)
    bar.update(RECORD, log_line=True)
    frame = Console(width=80, record=True, file=io.StringIO())
    frame.print(bar.bar.make_tasks_table(bar.bar.tasks))  # the frame the live display draws
    bar.close()
    lines = frame.export_text().rstrip("\n").split("\n")
    assert all(len(line) <= 80 for line in lines)
    assert re.match(r"^[━╸╺ ]{20} +37/100 (-:--:--|\d+:\d\d:\d\d) loss 7.123", lines[0]), lines[0]
    assert lines[0][:20].count("━") >= 7  # 37 % of the bar drawn
    assert " ".join(" ".join(line.split()) for line in lines).endswith(compact_record(RECORD))  # wrapped, not cut


def test_plain_log_line_without_terminal(capsys) -> None:
    bar = Progress(total=10, start=0, enabled=True)  # pytest's stdout is no terminal: log lines instead
    assert bar.bar is None
