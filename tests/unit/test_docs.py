"""Docs that are true: every ``launch.py`` command in the fenced blocks of README.md and docs/*.md
composes and plans as written (in-process dry run; training commands are planned, not trained), a
command shown with its refusal prints exactly that line, and docs/planner.md's reference table is the
one ``python -m hpframe.plan.reference_table`` computes from the recipes."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from hpframe.config.convert import to_run_config
from hpframe.config.store import CONF_DIR, register_configs
from hpframe.plan import reference_table
from hpframe.run import main

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KNOWN_VARIABLES = {"$SLURM_NNODES": "2", "$RUN_DIR": "outputs/slurm-1"}  # from the SLURM example's #SBATCH lines


def _logical_lines(lines: list[str]) -> list[tuple[int, int, str]]:
    """(first index, last index, text) of the lines inside fenced blocks, backslash continuations joined."""
    out, fenced, i = [], False, 0
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            first, text = i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            out.append((first, i, text))
        i += 1
    return out


def _commands() -> list[tuple[str, list[str], str]]:
    """(where, launch.py arguments, expected refusal line or '') of every launch.py command in a fenced block."""
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        for first, last, text in _logical_lines(lines):
            if "launch.py" not in text:
                continue
            args_text = re.split(r"\s[#&|;]|\s&$", text.split("launch.py", 1)[1] + " ")[0]
            for var, value in KNOWN_VARIABLES.items():
                args_text = args_text.replace(f'"{var}"', value).replace(var, value)
            nxt = lines[last + 1] if last + 1 < len(lines) else ""
            expected = nxt if nxt.startswith("hpframe: invalid configuration:") else ""
            found.append((f"{doc.name}:{first + 1}", shlex.split(args_text), expected))
    return found


COMMANDS = _commands()


def _runs(args: list[str]) -> list[list[str]]:
    """The override lists a command composes: one, or one per point of a ``-m`` sweep."""
    if "-m" not in args:
        return [args]
    sweep = [a.split("=", 1) for a in args if a != "-m"]
    values = [[f"{k}={v}" for v in value.split(",")] for k, value in sweep]
    return [list(point) for point in itertools.product(*values)]


def test_found_the_commands() -> None:
    where = {w.split(":")[0] for w, _, _ in COMMANDS}
    assert {"README.md", "training.md", "planner.md", "checkpointing.md"} <= where
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("where, args, expected", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_doc_command_plans(where: str, args: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    if any(a.startswith("--") for a in args):
        pytest.skip("--cfg / --config-dir / --help: tested in test_help.py and tests/e2e")
    if any("..." in a or "$" in a for a in args):
        pytest.skip("a placeholder, not a command")
    if any(a.startswith("model.from_hf=") for a in args):
        pytest.skip("needs a downloaded model directory (model.from_hf=DIR with its config.json)")
    register_configs()
    for overrides in _runs(args):
        overrides = [o for o in overrides if not o.startswith("plan.dry_run=")] + ["plan.dry_run=true"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = to_run_config(compose(config_name="config", overrides=overrides))
        code = main(cfg)
        err = capsys.readouterr().err.strip()
        if expected:
            assert code == 2 and err == expected, err
        else:
            assert code == 0, f"{where}: {' '.join(overrides)}\n{err}"


def test_planner_reference_table_matches_the_code() -> None:
    doc = (REPO / "docs" / "planner.md").read_text()
    assert reference_table.block_in(doc) == reference_table.render(), \
        "docs/planner.md is stale: run python -m hpframe.plan.reference_table --write"
