"""``launch.py --help`` lists every recipe, config group and common key with a one-line description
taken from the code; recipes kept outside the package work through ``--config-dir`` (the example of
docs/training.md), and a misspelled key in such a recipe is refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hpframe.config import schema
from hpframe.config.help import COMMON_KEYS, field_docs, render_help
from hpframe.config.store import RECIPES_DIR, recipe_names

REPO = Path(__file__).resolve().parents[2]


def test_help_lists_recipes_groups_and_documented_keys() -> None:
    text = render_help()
    lines = text.splitlines()
    for name in recipe_names():
        assert any(line.startswith(f"  {name} ") and len(line.split()) > 3 for line in lines), name
    for group in ("cluster", "parallel", "train", "data", "checkpoint", "experiment"):
        assert any(line.startswith(f"  {group} ") for line in lines), group
    docs = field_docs()
    for key in COMMON_KEYS:
        section, name = key.split(".")
        assert name in getattr(schema.RunConfig(), section).__dataclass_fields__, key
        assert docs.get(key), f"{key} has no docstring in schema.py"
        assert any(line.startswith(f"  {key} ") and docs[key][:20] in line for line in lines), key
    assert docs["parallel.tp"].startswith("Tensor-parallel degree")


EXTERNAL = """\
# @package _global_
# my Mixtral variant, kept outside hpframe
defaults:
  - /recipe/mixtral_debug
recipe: mine
model:
  num_layers: 3
"""


def test_external_recipe_dir(tmp_path: Path) -> None:
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(EXTERNAL)
    cmd = [sys.executable, str(REPO / "launch.py"), "--config-dir", str(tmp_path), "recipe=mine", "plan.dry_run=true",
           "plan.format=json"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["recipe"] == "mine" and doc["model"] == "mixtral_debug"
    assert [i for s in doc["pipeline"]["stages"] for i in s["layers"]] == [0, 1, 2]  # 3 blocks, not the recipe's 4
    (tmp_path / "recipe" / "mine.yaml").write_text(EXTERNAL.replace("num_layers: 3", "num_layer: 3"))
    bad = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "hpframe: invalid configuration: model.num_layer: no such key in 'model' (did you mean model.num_layers?) "
        "(in recipe/mine.yaml)"]
    helped = subprocess.run([sys.executable, str(REPO / "launch.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and helped.stdout.strip() == render_help().strip()
