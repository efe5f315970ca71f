"""The reference table of docs/planner.md, computed from the recipes by the planner.

``python -m hpframe.plan.reference_table`` prints the Markdown block that docs/planner.md holds between
``<!-- reference-table -->`` and ``<!-- /reference-table -->``; ``--write`` replaces that block in the
file. tests/unit/test_docs.py fails when the docs and the planner disagree, so the figures cannot
drift again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpframe.config.schema import Recompute, RunConfig
from hpframe.plan.planner import make_plan
from hpframe.plan.suggest import suggest_layouts

RECIPES = {  # recipe -> published size (total / active parameters)
    "mixtral_8x7b": "published: 46.7 B / 12.9 B",
    "mixtral_8x22b": "published: 141 B / 39 B",
    "deepseek_v3": "published: 671 B / 37 B",
    "gpt3_175b": "published: 175 B, with biases and learned positions",
}
BEGIN, END = "<!-- reference-table -->", "<!-- /reference-table -->"
DOC = Path(__file__).resolve().parents[2] / "docs" / "planner.md"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def _compose(recipe: str) -> RunConfig:
    from hydra import compose, initialize_config_dir

    from hpframe.config.convert import to_run_config
    from hpframe.config.store import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=[f"recipe={recipe}"]))


def _row(recipe: str, published: str) -> str:
    cfg = _compose(recipe)
    plan = make_plan(cfg)
    assert plan.memory is not None and plan.time is not None and plan.checkpoint is not None
    params = f"{plan.params.total:,}" + (f" / {plan.params.active:,}" if plan.params.active != plan.params.total else "")
    layout = f"tp{plan.tp} pp{plan.pp} dp{plan.dp}" + (f" ep{plan.ep}" if plan.experts else "") + f", ZeRO-{plan.zero_stage}"
    if cfg.parallel.recompute != Recompute.none:
        layout += f", {cfg.parallel.recompute.value} recompute"
    ckpt = plan.checkpoint
    return (f"| {recipe} ({cfg.cluster.name}) | {params} ({published}) | {layout} | {plan.memory.total / 2**30:.1f} GiB | "
            f"{_duration(plan.time.step_seconds)} | {_duration(ckpt.interval_seconds)} = {ckpt.interval_steps} steps |")


def _fastest_suggestion(recipe: str) -> str:
    cfg = _compose(recipe)
    best = suggest_layouts(cfg, make_plan(cfg), limit=1)[0]
    return (f"`plan.suggest=true` for {recipe} ranks first tp{best.tp} pp{best.pp} dp{best.dp} ep{best.ep}, "
            f"ZeRO-{best.zero_stage}: {best.memory_bytes / 2**30:.1f} GiB, {_duration(best.step_seconds)} per step.")


def render() -> str:
    """The Markdown block (table and the fastest suggested layout for mixtral_8x7b)."""
    lines = [BEGIN, "| recipe | total / active params | layout | memory/GPU (worst) | step (upper bound) | checkpoint interval |",
             "|---|---|---|---|---|---|"]
    lines += [_row(recipe, published) for recipe, published in RECIPES.items()]
    lines += ["", _fastest_suggestion("mixtral_8x7b"), END]
    return "\n".join(lines)


def block_in(text: str) -> str:
    """The reference block of a document's text ('' when absent)."""
    if BEGIN not in text or END not in text:
        return ""
    return text[text.index(BEGIN): text.index(END) + len(END)]


def main(argv: list[str]) -> int:
    block = render()
    if "--write" in argv:
        text = DOC.read_text()
        DOC.write_text(text.replace(block_in(text), block) if block_in(text) else text + "\n" + block + "\n")
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
