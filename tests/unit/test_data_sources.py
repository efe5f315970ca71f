"""prepare with a model directory's tokenizer, on JSON Lines, Parquet, directories and globs.

The model directory is built here as ``save_pretrained`` lays it out (tokenizer.json written by the
`tokenizers` library, tokenizer_config.json with eos/bos tokens and add_bos_token, config.json with
vocab_size); nothing is downloaded. The ids written must be exactly ``tokenizer.encode(document)``
framed by BOS and EOS, in input order, identical with 1 and 2 worker processes; the dataset's
tokenizer.json is the model's, unchanged. User errors (non-UTF-8 input, an empty corpus, a tokenizer
larger than the model's vocabulary, a missing JSON field or Parquet column, a pattern matching
nothing, an existing dataset) exit 2 with the file and the numbers. CPU only.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from hpframe.data.dataset import DataError, ShardedTokens
from hpframe.data.prepare import main, prepare

CORPUS = ["the cat sat on the mat", "a dog ran to the park", "ünïcode text stays whole", "one more line of words"]


def make_model_dir(path, *, vocab_size: int | None = None, add_bos: bool = True):
    """A directory as save_pretrained writes it: tokenizer.json, tokenizer_config.json, config.json."""
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": add_bos}))
    size = tok.get_vocab_size(with_added_tokens=True)
    (path / "config.json").write_text(json.dumps({"model_type": "mixtral", "vocab_size": vocab_size or size + 6}))
    return tok


def _docs(out) -> list[list[int]]:
    src = ShardedTokens(out)
    ids = src.read(0, src.num_tokens).tolist()
    docs, cur = [], []
    for i in ids:
        cur.append(i)
        if i == src.meta["eos_id"]:
            docs.append(cur)
            cur = []
    assert not cur
    return docs


@pytest.fixture()
def corpus(tmp_path):
    """JSON Lines (field 'content'), Parquet (column 'content') and text files in a directory."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    with open(root / "a.jsonl", "w") as f:
        for text in CORPUS[:2]:
            f.write(json.dumps({"id": 1, "content": text}) + "\n")
        f.write("\n")  # blank lines are skipped
    pq.write_table(pa.table({"content": CORPUS[2:], "n": [1, 2]}), root / "b.parquet")
    (root / "sub" / "c.txt").write_text("plain file\nof two lines\n", encoding="utf-8")
    (root / "ignored.csv").write_text("x,y\n")
    return root


def test_model_tokenizer_on_jsonl_parquet_and_text(corpus, tmp_path):
    model = tmp_path / "model"
    tok = make_model_dir(model)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    one = prepare([corpus], tmp_path / "one", tokenizer=model, field="content", shard_tokens=11)
    expected = [[bos] + tok.encode(t, add_special_tokens=False).ids + [eos] for t in CORPUS]
    lines = ["plain file\n", "of two lines\n"]
    expected.append([bos] + [i for ln in lines for i in tok.encode(ln, add_special_tokens=False).ids] + [eos])
    assert _docs(tmp_path / "one") == expected
    assert one["eos_id"] == eos and one["bos_id"] == bos and one["num_documents"] == 5 and len(one["shards"]) > 3
    assert one["vocab_size"] == tok.get_vocab_size() and one["model_vocab_size"] == tok.get_vocab_size() + 6
    assert Tokenizer.from_file(str(tmp_path / "one" / "tokenizer.json")).to_str() == tok.to_str()
    assert [p.rsplit("/", 1)[-1] for p in one["sources"]] == ["a.jsonl", "b.parquet", "c.txt"]
    # two worker processes and a glob give the same stream
    assert main([str(corpus / "**" / "*.*l"), str(corpus / "*.parquet"), str(corpus / "sub"), "--out", str(tmp_path / "two"),
                 "--tokenizer", str(model), "--field", "content", "--workers", "2", "--shard-tokens", "11"]) == 0
    a, b = ShardedTokens(tmp_path / "one"), ShardedTokens(tmp_path / "two")
    assert np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))


def test_user_errors_name_file_and_numbers(corpus, tmp_path, capsys):
    model = tmp_path / "model"
    tok = make_model_dir(model, add_bos=False)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("fine line\ncaf\xe9\n".encode("latin-1"))
    assert main([str(corpus / "a.jsonl"), str(bad), "--out", str(tmp_path / "x"), "--tokenizer", str(model),
                 "--workers", "1", "--shard-tokens", "4", "--field", "content"]) == 2
    assert f"{bad}: line 2 is not UTF-8 (byte 0xe9 at column 4" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["tokenizer.json"]  # the shards written so far are gone
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e1.txt").write_text("")
    (empty / "e2.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match=rf"empty corpus: no text in 2 input file\(s\) \({empty}/e1.txt, {empty}/e2.jsonl\)"):
        prepare([empty], tmp_path / "y", tokenizer=model)
    with pytest.raises(DataError, match=rf"{corpus}/a.jsonl: line 1 has no string field 'text' \(found: id, content\)"):
        prepare([corpus / "a.jsonl"], tmp_path / "y", tokenizer=model)
    with pytest.raises(DataError, match=rf"{corpus}/b.parquet: no column 'body' \(columns: content, n\)"):
        prepare([corpus / "b.parquet"], tmp_path / "y", tokenizer=model, field="body")
    with pytest.raises(DataError, match=r"input pattern '.*nothing\*.txt' matches no file"):
        prepare([tmp_path / "nothing*.txt"], tmp_path / "y", tokenizer=model)
    small = tok.get_vocab_size() - 3
    (model / "config.json").write_text(json.dumps({"vocab_size": small}))
    with pytest.raises(DataError, match=rf"{model}/tokenizer.json: the tokenizer has {small + 3} ids, more than the model's vocab_size={small}"):
        prepare([corpus], tmp_path / "y", tokenizer=model, field="content")
    (model / "config.json").write_text(json.dumps({"vocab_size": small + 3}))
    (model / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DataError, match=r"no end-of-sequence token in tokenizer_config.json .* name one with --eos"):
        prepare([corpus], tmp_path / "y", tokenizer=model, field="content")
    prepare([corpus], tmp_path / "z", tokenizer=model, field="content", eos="</s>")
    with pytest.raises(DataError, match=r"z/meta.json exists: .* already holds a dataset"):
        prepare([corpus], tmp_path / "z", tokenizer=model, field="content", eos="</s>")


def test_eval_path_and_the_model_tokenizer_check(corpus, tmp_path):
    """data.eval_path: all of data.path trains, all of the eval set evaluates; a dataset from another
    tokenizer is refused for eval_path and for model.from_hf."""
    from hpframe.config.schema import DataKind, RunConfig
    from hpframe.data import build_splits, build_source

    model = tmp_path / "model"
    make_model_dir(model)
    train_meta = prepare([corpus], tmp_path / "train", tokenizer=model, field="content")
    eval_meta = prepare([corpus / "sub"], tmp_path / "eval", tokenizer=model)
    cfg = RunConfig()
    cfg.data.kind, cfg.data.path, cfg.data.eval_path, cfg.data.seq_len = DataKind.tokenized, str(tmp_path / "train"), str(tmp_path / "eval"), 4
    cfg.model.vocab_size = 300
    source, _ = build_source(cfg)
    train, evals, what = build_splits(cfg, source)
    assert train.num_sequences == (train_meta["num_tokens"] - 1) // 4 and evals.num_sequences == (eval_meta["num_tokens"] - 1) // 4
    assert what == f"eval set {tmp_path / 'eval'}"
    assert np.array_equal(evals[0], ShardedTokens(tmp_path / "eval").read(0, 5))
    prepare([corpus], tmp_path / "other", vocab_size=280, field="content")
    cfg.data.eval_path = str(tmp_path / "other")
    with pytest.raises(DataError, match=r"data.eval_path=.*other' \(vocab 2\d\d, eos \d+\) and data.path=.* come from different tokenizers"):
        build_splits(cfg, source)
    cfg.model.from_hf = str(model)
    cfg.data.path = str(tmp_path / "other")
    with pytest.raises(DataError, match=r"data.path=.*other' was not tokenized with the tokenizer of model.from_hf="):
        build_source(cfg)
    cfg.data.path = str(tmp_path / "train")
    assert build_source(cfg)[0].num_tokens == train_meta["num_tokens"]


def test_data_inputs_are_prepared_through_the_run_config(corpus, tmp_path):
    """data.inputs: build_data's first step prepares data.path with model.from_hf's tokenizer (else a
    BPE of model.vocab_size entries), once; a dataset of other inputs there is refused."""
    from hpframe.config.schema import DataKind, RunConfig
    from hpframe.data import ensure_prepared

    model = tmp_path / "model"
    make_model_dir(model)
    direct = prepare([corpus], tmp_path / "direct", tokenizer=model, field="content")
    cfg = RunConfig()
    cfg.data.kind, cfg.data.path, cfg.data.inputs, cfg.data.text_field = DataKind.tokenized, str(tmp_path / "auto"), [str(corpus)], "content"
    cfg.model.from_hf = str(model)
    ensure_prepared(cfg, rank=0)
    a, b = ShardedTokens(tmp_path / "direct"), ShardedTokens(tmp_path / "auto")
    assert np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens)) and b.meta["sources"] == direct["sources"]
    stamp = (tmp_path / "auto" / "meta.json").stat().st_mtime_ns
    ensure_prepared(cfg, rank=0)  # already prepared from these inputs: left alone
    assert (tmp_path / "auto" / "meta.json").stat().st_mtime_ns == stamp
    cfg.data.inputs = [str(corpus / "sub")]
    with pytest.raises(DataError, match=r"data.path=.*auto' holds a dataset prepared from \[.*a.jsonl.*\], not from data.inputs \(\[.*c.txt'\]\)"):
        ensure_prepared(cfg, rank=0)
    scratch = RunConfig()
    scratch.data.kind, scratch.data.path, scratch.data.inputs = DataKind.tokenized, str(tmp_path / "bpe"), [str(corpus / "sub")]
    scratch.model.vocab_size = 280
    ensure_prepared(scratch, rank=0)
    meta = ShardedTokens(tmp_path / "bpe").meta
    assert meta["tokenizer_source"].startswith("byte-level BPE") and meta["vocab_size"] <= 280
    scratch.data.kind = DataKind.synthetic
    with pytest.raises(DataError, match=r"data.inputs=.* needs data.kind=tokenized and data.path=DIR"):
        ensure_prepared(scratch, rank=0)
