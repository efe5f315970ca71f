"""``python -m hpframe.plot RUN_DIR [--out DIR]``: draw a run's metrics.jsonl into PNG files.

Written to RUN_DIR/plots/ (or --out): loss.png (loss, LM loss, evaluation loss), lr.png (learning
rate), throughput.png (tokens/s and MFU), expert_load.png (each expert's share of the routed tokens
per step, summed over MoE layers, with the load's coefficient of variation; dense runs: the CV only).
Uses matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records holding a number under ``key`` (nulls and other lines skipped)."""
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _figure(title: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_loss(records: list[dict[str, Any]], out: Path) -> Path:
    """loss and LM loss per step, evaluation loss at its steps."""
    fig, ax = _figure("loss")
    for key, style in (("loss", "-"), ("lm_loss", "--"), ("eval_loss", "o-")):
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, style, label=key)
    ax.legend()
    return _save(fig, out / "loss.png")


def plot_lr(records: list[dict[str, Any]], out: Path) -> Path:
    """The learning rate per step (the schedule as it ran)."""
    fig, ax = _figure("learning rate")
    ax.plot(*_series(records, "lr"))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    return _save(fig, out / "lr.png")


def plot_throughput(records: list[dict[str, Any]], out: Path) -> Path:
    """tokens/s per step; MFU (proportional to it within a run) on the right-hand axis."""
    fig, ax = _figure("throughput")
    steps, tps = _series(records, "tokens_per_s")
    ax.plot(steps, tps)
    ax.set_ylabel("tokens/s")
    ratios = [r["mfu"] / r["tokens_per_s"] for r in records if r.get("mfu") and r.get("tokens_per_s")]
    if ratios:
        k = 100 * ratios[0]
        ax.secondary_yaxis("right", functions=(lambda x: x * k, lambda y: y / k)).set_ylabel("MFU %")
    return _save(fig, out / "throughput.png")


def plot_expert_load(records: list[dict[str, Any]], out: Path) -> Path:
    """Each expert's share per step as a heat map (experts x steps); the load CV for runs without ``expert_load``."""
    loads = [(r["step"], r["expert_load"]) for r in records if r.get("expert_load")]
    fig, ax = _figure("expert load: share of routed tokens per expert")
    if loads:
        steps = [s for s, _ in loads]
        shares = [list(x) for x in zip(*(load for _, load in loads))]  # experts x steps
        image = ax.imshow(shares, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis",
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(shares) - 0.5))
        ax.set_ylabel("expert")
        fig.colorbar(image, ax=ax, label=f"share (balanced: {1 / len(shares):.3f})")
    else:
        steps, cv = _series(records, "expert_load_cv")
        ax.plot(steps, cv, label="expert_load_cv")
        ax.legend()
    return _save(fig, out / "expert_load.png")


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Draw every figure of ``run_dir/metrics.jsonl`` into ``out`` (default RUN_DIR/plots); return the files."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = out or run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    return [plot(records, out) for plot in (plot_loss, plot_lr, plot_throughput, plot_expert_load)]


def main(argv: list[str] | None = None) -> int:
    """Command line; exit code 2 when RUN_DIR holds no metrics.jsonl."""
    parser = argparse.ArgumentParser(prog="python -m hpframe.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="where the PNG files go (default RUN_DIR/plots)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"hpframe.plot: no metrics.jsonl in {args.run_dir}", file=sys.stderr)
        return 2
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
