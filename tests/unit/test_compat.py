"""The start-up check of library versions and internals (hpframe/engine/compat.py), in one process.

Other versions are simulated by passing version strings, and a missing internal by deleting the
attribute from DeepSpeed's class for the length of one test (monkeypatch restores it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hpframe.engine import compat

DOCS = Path(__file__).resolve().parents[2] / "docs" / "design.md"


def test_installed_versions_are_the_tested_ones() -> None:
    versions = compat.installed_versions()
    assert compat.check_libraries(versions) == []
    assert compat.check_libraries({"deepspeed": "0.19.8", "torch": "2.11.0+cu130"}) == []


@pytest.mark.parametrize(("versions", "named"), [
    ({"deepspeed": "0.20.1", "torch": "2.13.0+cpu"}, [("deepspeed 0.20.1", "0.19.8")]),
    ({"deepspeed": "0.19.9", "torch": "2.13.0"}, [("deepspeed 0.19.9", "0.19.8")]),
    ({"deepspeed": "0.19.8", "torch": "2.14.1+cu130"}, [("torch 2.14.1+cu130", "2.11 / 2.13")]),
    ({"deepspeed": "0.18.0", "torch": "2.9.0"}, [("deepspeed 0.18.0", "0.19.8"), ("torch 2.9.0", "2.11 / 2.13")]),
])
def test_untested_version_warns_naming_both(versions: dict[str, str], named: list[tuple[str, str]]) -> None:
    warnings = compat.check_libraries(versions)
    assert len(warnings) == len(named)
    for text, (installed, written_for) in zip(warnings, named):
        assert text.startswith(f"{installed} is installed") and f"written for {written_for}" in text


def test_missing_internal_is_an_error_naming_it_and_both_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.utils import groups

    monkeypatch.delattr(BF16_Optimizer, "update_hp_grads")
    monkeypatch.delattr(groups, "_EXPERT_PARALLEL_GROUP")
    with pytest.raises(compat.LibraryVersionError) as err:
        compat.check_libraries({"deepspeed": "0.21.0", "torch": "2.13.0"})
    msg = str(err.value)
    assert "deepspeed 0.21.0 (written for 0.19.8)" in msg
    assert "deepspeed.runtime.bf16_optimizer:BF16_Optimizer.update_hp_grads (replaces in hpframe/engine/bf16_grads.py" in msg
    assert "deepspeed.utils.groups:_EXPERT_PARALLEL_GROUP (writes in hpframe/engine/moe_bridge.py" in msg
    assert "torch" not in msg.split(":", 1)[0]  # torch's internals are all there


def test_every_internal_is_documented_in_design_md() -> None:
    """docs/design.md's table lists each entry of PATCHES by its target (the docs cannot drift)."""
    text = DOCS.read_text()
    section = text[text.index("## Library internals"):]
    documented = set(re.findall(r"`([\w.]+:[\w.]+)`", section))
    assert documented == {p.target for p in compat.PATCHES}
    assert all(Path(__file__).resolve().parents[2].joinpath("hpframe", p.where.split()[0].rstrip(",")).is_file()
               for p in compat.PATCHES)


def test_installed_version_strings_are_read_at_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check reads the libraries' own ``__version__`` when called (here monkeypatched)."""
    import deepspeed
    import torch

    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    monkeypatch.setattr(torch, "__version__", "2.14.0+cu130")
    warnings = compat.check_libraries()
    assert [w.split(" is installed")[0] for w in warnings] == ["deepspeed 0.20.0", "torch 2.14.0+cu130"]
    assert "written for 0.19.8" in warnings[0] and "written for 2.11 / 2.13" in warnings[1]
