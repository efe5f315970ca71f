"""Crash-safe checkpoint directories (hpframe.checkpoint.store), on the local filesystem, no torch.

Checks: commit is atomic and moves `latest` last; a staging directory left by a killed save is never
picked; truncation and bit flips are detected with the file named; discovery falls back to the newest
good checkpoint; pruning keeps the newest N.
"""

from pathlib import Path

import pytest

from hpframe.checkpoint import store


def _save(root: Path, step: int, payload: bytes = b"weights") -> Path:
    tag = store.tag_for_step(step)
    stage = store.staging_path(root, tag)
    (stage / "shards").mkdir(parents=True)
    (stage / "shards" / "rank0.bin").write_bytes(payload * 100)
    (stage / "meta.json").write_text('{"step": %d}' % step)
    store.write_manifest(stage, step)
    return store.commit(root, tag)


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
        _save(tmp_path, s)
    removed = store.prune(tmp_path, keep_last=2)
    assert [p.name for p in store.committed(tmp_path)] == ["step_00000004", "step_00000005"]
    assert len(removed) == 3
