"""Crash-safe checkpoint directories (hpframe.checkpoint.store), on the local filesystem; the store needs no
torch (the manager and metrics checks at the end import it).

Checks: commit is atomic and moves `latest` last; a staging directory left by a killed save is never
picked; truncation and bit flips are detected with the file named; discovery falls back to the newest
good checkpoint; pruning keeps the newest N. Lines (issue 16): pruning never removes what `latest`
names and counts only its line; resuming follows `latest`, not the highest step, and falls back only
within its lineage; checkpoints that all fail are refused with every reason; a malformed manifest is
a failed verification, never another exception.
"""

from pathlib import Path

import pytest

from hpframe.checkpoint import store


def _save(root: Path, step: int, payload: bytes = b"weights", lineage: dict | None = None) -> Path:
    tag = store.tag_for_step(step)
    stage = store.staging_path(root, tag)
    (stage / "shards").mkdir(parents=True)
    (stage / "shards" / "rank0.bin").write_bytes(payload * 100)
    (stage / "meta.json").write_text('{"step": %d}' % step)
    store.write_manifest(stage, step, extra=lineage)
    return store.commit(root, tag)


def _truncate(ckpt: Path) -> Path:
    f = ckpt / "shards" / "rank0.bin"
    f.write_bytes(f.read_bytes()[:-7])
    return f


def test_commit_and_latest(tmp_path):
    p1 = _save(tmp_path, 10)
    p2 = _save(tmp_path, 20)
    assert (tmp_path / "latest").read_text().strip() == p2.name
    assert store.verify(p1)["step"] == 10
    found = store.find_latest_good(tmp_path)
    assert found.path == p2 and found.step == 20 and found.skipped == ()
    assert not list(tmp_path.glob(".staging-*"))


def test_interrupted_save_is_ignored(tmp_path):
    _save(tmp_path, 10)
    stage = store.staging_path(tmp_path, store.tag_for_step(20))  # killed before the manifest
    stage.mkdir()
    (stage / "rank0.bin").write_bytes(b"partial")
    assert store.find_latest_good(tmp_path).step == 10
    with pytest.raises(store.CheckpointError, match="without MANIFEST"):
        store.commit(tmp_path, store.tag_for_step(20))
    store.prune(tmp_path, keep_last=3)
    assert not stage.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corruption_detected_and_fallback(tmp_path, damage):
    _save(tmp_path, 10)
    bad = _save(tmp_path, 20)
    f = bad / "shards" / "rank0.bin"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[:-7])
        msg = "truncated"
    elif damage == "flip":
        f.write_bytes(bytes([data[0] ^ 1]) + data[1:])
        msg = "corrupted"
    else:
        f.unlink()
        msg = "missing"
    with pytest.raises(store.CheckpointError, match=msg) as info:
        store.verify(bad)
    assert "rank0.bin" in str(info.value)
    found = store.find_latest_good(tmp_path)
    assert found.step == 10 and len(found.skipped) == 1 and "rank0.bin" in found.skipped[0]


def test_missing_manifest_and_empty_root(tmp_path):
    assert store.find_latest_good(tmp_path / "nothing") is None
    (tmp_path / "step_00000005").mkdir()
    with pytest.raises(store.CheckpointError, match="no MANIFEST.json"):
        store.verify(tmp_path / "step_00000005")
    assert store.find_latest_good(tmp_path) is None


def test_prune_keeps_newest(tmp_path):
    for s in (1, 2, 3, 4, 5):
        _save(tmp_path, s, lineage={"line": "a", "parent": None})
    removed = store.prune(tmp_path, keep_last=2)
    assert [p.name for p in store.committed(tmp_path)] == ["step_00000004", "step_00000005"]
    assert len(removed) == 3


# ---- lines, resume choice, pruning (issue 16) ---------------------------------------------------------


def _line(root: Path, steps: list[int], lineage: dict) -> list[Path]:
    return [_save(root, s, payload=lineage["line"].encode(), lineage=lineage) for s in steps]


def test_prune_never_removes_what_latest_names(tmp_path):
    """keep_last=1 with a leftover higher-step checkpoint of another line: each save survives its prune."""
    _line(tmp_path, [100], {"line": "abandoned", "parent": None})
    (tmp_path / "step_00000200").mkdir()  # damaged leftover: no manifest
    fresh = {"line": "fresh", "parent": None}
    for step in (2, 4, 6):
        _save(tmp_path, step, lineage=fresh)
        store.prune(tmp_path, keep_last=1)
        assert (tmp_path / (tmp_path / "latest").read_text().strip()).is_dir(), step
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000006", "step_00000100", "step_00000200"]


def test_prune_keeps_newest_verified_when_latest_is_damaged(tmp_path):
    a2, a4, a6 = _line(tmp_path, [2, 4, 6], {"line": "a", "parent": None})
    _truncate(a6)
    store.prune(tmp_path, keep_last=1)
    assert store.committed(tmp_path) == [a4, a6]  # latest (damaged) and the newest save that verifies
    legacy = tmp_path / "legacy"
    _save(legacy, 1), _save(legacy, 2)  # written before lines: the current line is unknown
    store.prune(legacy, keep_last=1)
    assert len(store.committed(legacy)) == 2


def test_resume_follows_latest_not_the_highest_step(tmp_path):
    """A branch from step 4 into the same root: `latest` names the branch, not the abandoned step 8."""
    a = _line(tmp_path, [2, 4, 6, 8], {"line": "a", "parent": None})
    branch = {"line": "b", "parent": {"line": "a", "step": 4}}
    b6 = _save(tmp_path, 6, lineage=branch)  # replaces a's step 6
    assert store.find_latest_good(tmp_path).path == b6
    bad = _truncate(b6)  # latest fails: fall back within its lineage (a's step 4), never to a's step 8
    found = store.find_latest_good(tmp_path)
    assert found.path == a[1] and len(found.skipped) == 1
    assert f"{bad}:" in found.skipped[0] and "truncated" in found.skipped[0]


def test_lines_of_resumed_runs(tmp_path):
    """Resuming what `latest` names continues its line; anything else starts a new one; pruning counts one line."""
    a = _line(tmp_path, [2, 4, 6, 8], {"line": "a", "parent": None})
    branch = store.line_after_resume(tmp_path, a[1], store.verify(a[1]))
    assert branch["line"] != "a" and branch["parent"] == {"line": "a", "step": 4}
    b6 = _save(tmp_path, 6, lineage=branch)
    sel = store.select_for_resume(tmp_path)
    assert (sel.path, sel.from_latest, sel.skipped) == (b6, True, ())
    assert store.line_after_resume(tmp_path, sel.path, sel.manifest) == branch
    store.prune(tmp_path, keep_last=1)  # counts only the branch's line
    assert [p.name for p in store.committed(tmp_path)] == ["step_00000002", "step_00000004", "step_00000006", "step_00000008"]
    _truncate(b6)
    sel = store.select_for_resume(tmp_path)
    assert sel.path == a[1] and not sel.from_latest
    again = store.line_after_resume(tmp_path, sel.path, sel.manifest)
    assert again["line"] not in ("a", branch["line"]) and again["parent"] == {"line": "a", "step": 4}
    assert store.line_after_resume(tmp_path, None, None)["parent"] is None


def test_latest_missing_or_unreadable(tmp_path):
    a2, a4 = _line(tmp_path, [2, 4], {"line": "a", "parent": None})
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00\x01")
    sel = store.select_for_resume(tmp_path)
    assert sel.path == a4 and "latest: unreadable" in sel.skipped[0]
    (tmp_path / "latest").write_text("step_00000009\n")  # names a directory that is gone
    sel = store.select_for_resume(tmp_path)
    assert sel.path == a4 and sel.skipped == (f"{tmp_path / 'step_00000009'}: named by latest but missing",)
    empty = tmp_path / "emptied"  # every checkpoint deleted, `latest` left: refuse, do not restart from 0
    empty.mkdir()
    (empty / "latest").write_text("step_00000009\n")
    with pytest.raises(store.CheckpointError, match="latest: names step_00000009, which does not exist"):
        store.select_for_resume(empty)


def test_refuses_when_checkpoints_exist_but_none_verifies(tmp_path):
    a2, a4 = _line(tmp_path, [2, 4], {"line": "a", "parent": None})
    other = _save(tmp_path, 9, lineage={"line": "other", "parent": None})
    (tmp_path / "latest").write_text(a4.name)
    bad2, bad4 = _truncate(a2), _truncate(a4)
    with pytest.raises(store.CheckpointError) as info:
        store.select_for_resume(tmp_path)
    msg = str(info.value)
    assert f"{tmp_path}: 3 checkpoint(s), none usable for resuming" in msg
    assert f"{bad2}: " in msg and f"{bad4}: " in msg and msg.count("truncated") == 2
    assert f"{other}: line other, not in the lineage of step_00000004" in msg
    assert "checkpoint.resume=none" in msg
    assert store.find_latest_good(tmp_path) is None


def test_manager_refusal_and_resume_none(tmp_path):
    from hpframe.checkpoint import manager
    from hpframe.errors import UserError

    a2 = _save(tmp_path, 2, lineage={"line": "a", "parent": None})
    bad = _truncate(a2)
    with pytest.raises(UserError, match=r"checkpoint.resume='auto': .*none usable for resuming") as info:
        manager.resume_point("auto", tmp_path)
    assert info.value.key == "checkpoint.resume"
    assert f"{bad}: 693 bytes on disk, manifest says 700 (truncated?)" in str(info.value)
    fresh = manager.resume_point("none", tmp_path)
    assert fresh.path is None and fresh.lineage["parent"] is None and len(fresh.lineage["line"]) == 12
    assert manager.resume_point("auto", tmp_path / "empty").path is None
    explicit = manager.resume_point(str(_save(tmp_path / "b", 3, lineage={"line": "b", "parent": None})), tmp_path)
    assert explicit.lineage["parent"] == {"line": "b", "step": 3} and not explicit.verified


MALFORMED = {
    "null": b"null",
    "list": b"[1, 2]",
    "no files": b'{"step": 4}',
    "bad entry": b'{"step": 4, "files": {"meta.json": 3}}',
    "escaping path": b'{"step": 4, "files": {"../../etc/passwd": {"bytes": 1, "sha256": "x"}}}',
    "step of another dir": b'{"step": 5, "files": {}}',
    "bad parent": b'{"step": 4, "files": {}, "parent": 7}',
    "binary": bytes(range(256)),
    "deep": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("content", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_manifest_is_a_failed_verification(tmp_path, content):
    a2, a4 = _line(tmp_path, [2, 4], {"line": "a", "parent": None})
    (a4 / store.MANIFEST).write_bytes(content)
    with pytest.raises(store.CheckpointError, match="manifest") as info:
        store.verify(a4)
    assert str(a4 / store.MANIFEST) in str(info.value)
    sel = store.select_for_resume(tmp_path)  # latest's line is unknown now: the newest lower step that verifies
    assert sel.path == a2 and str(a4 / store.MANIFEST) in sel.skipped[0]
    store.prune(tmp_path, keep_last=1)  # cannot tell the line: removes nothing
    assert store.checkpoint_dirs(tmp_path) == [a2, a4]


def test_logged_steps_for_rerun_marks(tmp_path):
    """The steps a resumed run marks ``rerun``: training records only; a line torn by a killed writer is skipped."""
    from hpframe.train.loop import logged_steps

    assert logged_steps(tmp_path / "metrics.jsonl") == set()
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 5.0}\n{"step": 2, "eval_loss": 4.0}\n{"step": 2, "ckpt_stall_s": 0.1}\n'
        '{"step": 2, "loss": 4.9}\n{"step": 3, "lo')
    assert logged_steps(tmp_path / "metrics.jsonl") == {1, 2}
