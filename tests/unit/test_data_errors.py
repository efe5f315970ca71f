"""Damaged tokenized datasets stop with a DataError naming the file (issue 16, defect 9).

A dataset is written by ``prepare``, then damaged the way disks and hand edits damage it: an id beyond
the vocabulary inside a shard, a missing shard, a truncated shard, a shard path in meta.json that
leads outside the dataset directory (``..``, absolute, through a symbolic link), and a meta.json that
is not JSON. Each is checked by type and message. CPU only, no processes.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hpframe.config.schema import DataKind, RunConfig
from hpframe.data import build_source, split_sequences
from hpframe.data.dataset import DataError, ShardedTokens
from hpframe.data.prepare import prepare

TEXT = "alpha beta gamma delta epsilon\n" * 60


@pytest.fixture()
def dataset(tmp_path):
    src = tmp_path / "doc.txt"
    src.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "ds"
    prepare([src], out, vocab_size=300, shard_tokens=64)
    return out


def _meta(out):
    return json.loads((out / "meta.json").read_text())


def _write_meta(out, meta):
    (out / "meta.json").write_text(json.dumps(meta))


def test_id_beyond_vocabulary_names_shard_and_numbers(dataset):
    meta = _meta(dataset)
    shard = dataset / meta["shards"][1]["path"]
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[5] = meta["vocab_size"] + 7
    ids.tofile(shard)
    cfg = RunConfig()
    cfg.data.kind, cfg.data.path, cfg.model.vocab_size = DataKind.tokenized, str(dataset), meta["vocab_size"]
    source, _ = build_source(cfg)
    train, _ = split_sequences(source, 16, 0.1)
    train[0]  # shard 0 only: fine
    with pytest.raises(DataError, match=rf"{shard}: token id {meta['vocab_size'] + 7} at position 5 is outside the vocabulary of {meta['vocab_size']}"):
        train.batch(np.arange(train.num_sequences))


def test_missing_and_truncated_shards_are_named(dataset):
    meta = _meta(dataset)
    shard = dataset / meta["shards"][2]["path"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-6])
    n = meta["shards"][2]["num_tokens"]
    with pytest.raises(DataError, match=rf"{shard}: {2 * n - 6} bytes, but .*meta.json says {n} uint16 tokens \({2 * n} bytes\); the shard is truncated"):
        ShardedTokens(dataset)
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard}: shard listed in .*meta.json is missing"):
        ShardedTokens(dataset)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_shard_paths_are_confined_to_the_dataset_directory(dataset, tmp_path, how):
    meta = _meta(dataset)
    outside = tmp_path / "outside.bin"
    (dataset / meta["shards"][0]["path"]).rename(outside)  # a valid shard, but not in the directory
    if how == "dotdot":
        meta["shards"][0]["path"] = "../outside.bin"
    elif how == "absolute":
        meta["shards"][0]["path"] = str(outside)
    else:
        os.symlink(outside, dataset / "link.bin")
        meta["shards"][0]["path"] = "link.bin"
    _write_meta(dataset, meta)
    with pytest.raises(DataError, match=r"meta.json: shard path .* leads outside the dataset directory"):
        ShardedTokens(dataset)


def test_malformed_meta_is_named(dataset):
    (dataset / "meta.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(DataError, match=r"meta.json: not valid JSON"):
        ShardedTokens(dataset)
    _write_meta(dataset, {"format": "hpframe.tokens", "version": 1, "dtype": "uint16", "vocab_size": 300, "shards": [7]})
    with pytest.raises(DataError, match=r"meta.json: shard entry 7 needs a string 'path'"):
        ShardedTokens(dataset)
