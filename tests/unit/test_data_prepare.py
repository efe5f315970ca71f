"""prepare round trip: text files -> tokenizer + uint16 shards -> token ids that decode back to the text.

Covers the trained byte-level BPE and a local tokenizer.json, shard boundaries (reads spanning two
shards equal the concatenated stream), and the model.vocab_size check of data=tokenized. CPU only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from hpframe.config.schema import DataKind, RunConfig
from hpframe.data import build_source
from hpframe.data.dataset import ShardedTokens
from hpframe.data.prepare import EOS, main, prepare

TEXTS = [
    "The quick brown fox jumps over the lazy dog.\n" * 40 + "Ünïcödé: 漢字 and émojis 🙂\n\n  indented   spaces \n",
    "second document\nwith a final line without newline" + " more words" * 30,
]


@pytest.fixture()
def inputs(tmp_path):
    paths = []
    for i, text in enumerate(TEXTS):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    return paths


def _documents(out) -> list[str]:
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    src = ShardedTokens(out)
    ids = src.read(0, src.num_tokens)
    eos = src.meta["eos_id"]
    cuts = np.flatnonzero(ids == eos)
    assert ids[-1] == eos and len(cuts) == len(TEXTS)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(ids[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, cuts)]


def test_trained_bpe_round_trip_across_shards(inputs, tmp_path):
    out = tmp_path / "ds"
    meta = prepare(inputs, out, vocab_size=300, shard_tokens=97)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 300 and len(meta["shards"]) > 2
    assert json.loads((out / "meta.json").read_text()) == meta
    assert _documents(out) == TEXTS
    src = ShardedTokens(out)
    stream = np.concatenate([np.fromfile(out / s["path"], dtype=np.uint16) for s in meta["shards"]]).astype(np.int64)
    assert src.num_tokens == meta["num_tokens"] == stream.size
    assert np.array_equal(src.read(90, 20), stream[90:110])  # crosses the first shard boundary


def test_local_tokenizer_file_and_cli(inputs, tmp_path, capsys):
    first = tmp_path / "first"
    prepare(inputs, first, vocab_size=280)
    out = tmp_path / "second"
    assert main([str(p) for p in inputs] + ["--out", str(out), "--tokenizer", str(first / "tokenizer.json")]) == 0
    assert "data=tokenized" in capsys.readouterr().out
    assert _documents(out) == TEXTS
    a, b = ShardedTokens(first), ShardedTokens(out)
    assert np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))
    assert Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id(EOS) == b.meta["eos_id"]


def test_user_errors(inputs, tmp_path, capsys):
    assert main([str(inputs[0]), "--out", str(tmp_path / "x"), "--vocab-size", "100"]) == 2
    assert "--vocab-size=100" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not found"):
        prepare([tmp_path / "missing.txt"], tmp_path / "y", vocab_size=300)


def test_vocab_check_of_tokenized_data(inputs, tmp_path):
    out = tmp_path / "ds"
    meta = prepare(inputs, out, vocab_size=300)
    cfg = RunConfig()
    cfg.data.kind, cfg.data.path, cfg.model.vocab_size = DataKind.tokenized, str(out), meta["vocab_size"] - 1
    with pytest.raises(ValueError, match=rf"model.vocab_size={meta['vocab_size'] - 1} .*model.vocab_size>={meta['vocab_size']}"):
        build_source(cfg)
    cfg.model.vocab_size = meta["vocab_size"]
    source, description = build_source(cfg)
    assert source.num_tokens == meta["num_tokens"] and "tokenized" in description
    cfg.data.path = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match="has no meta.json"):
        build_source(cfg)
