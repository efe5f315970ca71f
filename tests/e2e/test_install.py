"""``pip install .`` (not editable): the wheel carries the configuration tree (hpframe/conf, every
recipe) and the ``hpframe`` console script; installed with pip into a separate folder, away from the
checkout, the script composes and plans a recipe (dry run). --no-deps: the dependencies come from the
test's own environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hpframe.config.store import CONF_DIR, RECIPES_DIR

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _pip(*args: str, cwd: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_wheel_ships_the_config_tree_and_console_script(tmp_path: Path) -> None:
    src = tmp_path / "src"  # build from a copy: the checkout gets no build/ or egg-info folders
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "hpframe", src / "hpframe", ignore=shutil.ignore_patterns("__pycache__", "local"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), ".", cwd=src)
    (wheel,) = (tmp_path / "dist").glob("hpframe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in [*CONF_DIR.rglob("*.yaml"), *RECIPES_DIR.glob("*.yaml")]:
        if path.parent.name != "local":
            assert f"hpframe/{path.relative_to(CONF_DIR.parent).as_posix()}" in names, path
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "hpframe = hpframe.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    target = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel), cwd=tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, not the checkout
    where = subprocess.run([sys.executable, "-c", "import hpframe.config.store as s; print(s.CONF_DIR)"], cwd=run_dir,
                           env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(target / "hpframe" / "conf"), where.stderr
    out = subprocess.run([str(target / "bin" / "hpframe"), "recipe=deepseek_v3", "plan.dry_run=true", "plan.format=json"],
                         cwd=run_dir, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"world_size": 2048' in out.stdout and '"recipe": "deepseek_v3"' in out.stdout
    helped = subprocess.run([str(target / "bin" / "hpframe"), "--help"], cwd=run_dir, env=env, capture_output=True, text=True,
                            timeout=60)
    assert helped.returncode == 0 and "  mixtral_8x7b " in helped.stdout and "  parallel.tp " in helped.stdout
