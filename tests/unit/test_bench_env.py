"""bench/common.py records, at run time, the commit, sources and library versions a benchmark ran with."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench import common

REPO = Path(__file__).resolve().parents[2]


def test_environment_reads_versions_and_commit_at_run_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import deepspeed
    import torch
    import transformers

    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")  # as on the GPU machines
    monkeypatch.setenv("BENCH_COMMIT", "0123abc")
    env = common.environment()
    assert (env["torch"], env["deepspeed"], env["transformers"]) == ("2.11.0+cu130", deepspeed.__version__,
                                                                       transformers.__version__)
    assert env["pinned"]["torch"] == "2.13.0" and env["differs_from_pin"] == ["torch"]
    assert (env["git_commit"], env["git_commit_from"]) == ("0123abc", "BENCH_COMMIT")
    assert env["source_sha256"] == common.source_digest()

    monkeypatch.delenv("BENCH_COMMIT")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    commit, source = common.git_commit()
    assert source == "git" and commit.removesuffix("+dirty") == head

    out = tmp_path / "run.env.json"
    assert common.main(["env", str(out), "--command", "python3 launch.py recipe=mixtral_h200"]) == 0
    written = json.loads(out.read_text())
    assert written["command"] == "python3 launch.py recipe=mixtral_h200"
    assert written["env"]["torch"] == "2.11.0+cu130" and written["env"]["git_commit"].removesuffix("+dirty") == head


def test_source_digest_follows_the_sources(tmp_path: Path) -> None:
    (tmp_path / "hpframe" / "engine").mkdir(parents=True)
    (tmp_path / "launch.py").write_text("print(1)\n")
    (tmp_path / "hpframe" / "engine" / "step.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not a source\n")
    before = common.source_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("changed\n")
    assert common.source_digest(tmp_path) == before
    (tmp_path / "hpframe" / "engine" / "step.py").write_text("x = 2\n")
    assert common.source_digest(tmp_path) != before


def test_every_results_folder_is_indexed() -> None:
    """bench/results/INDEX.md has a row for each result folder, and names no folder that is not there."""
    import re

    results = REPO / "bench" / "results"
    folders = {p.name for p in results.iterdir() if p.is_dir() and p.name != "local"}
    text = (results / "INDEX.md").read_text()
    table = text[:text.index("## Where each figure")]
    indexed = set(re.findall(r"\b(20\d\d-\d\d-\d\d_[\w]+)", table))
    assert indexed == folders
