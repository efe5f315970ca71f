"""Training data: the synthetic corpus, tokenized shards, and the dp-sharded loader.

``build_data(cfg, plan, rank)`` is the one call ``hpframe.run`` (and ``hpframe.evaluate``) makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hpframe.config.schema import DataKind, RunConfig
from hpframe.data.dataset import (ArrayTokens, DataError, SequenceSplit, ShardedTokens, TokenSource, all_sequences,
                                  split_sequences)
from hpframe.data.loader import ShardedLoader, eval_batches
from hpframe.data.synthetic import SEPARATOR, synthetic_corpus

if TYPE_CHECKING:
    from hpframe.plan import ParallelPlan


@dataclass
class Data:
    """What the training loop consumes: the train loader and this rank's fixed eval micro-batches."""

    train: ShardedLoader
    eval: list[torch.Tensor]
    train_split: SequenceSplit
    eval_split: SequenceSplit
    description: str
    eos_id: int | None = None
    """The document separator with ``data.document_mask`` (micro-batches then carry positions), else None."""


def _check_model_tokenizer(cfg: RunConfig, source: ShardedTokens, key: str) -> None:
    """With ``model.from_hf=DIR``, the dataset must have been tokenized by DIR's tokenizer.json."""
    model_dir = cfg.model.from_hf
    if not model_dir or not (Path(model_dir) / "tokenizer.json").is_file():
        return
    mine = source.path / str(source.meta.get("tokenizer", "tokenizer.json"))
    if not mine.is_file() or mine.read_bytes() != (Path(model_dir) / "tokenizer.json").read_bytes():
        raise DataError(
            f"{key}={str(source.path)!r} was not tokenized with the tokenizer of model.from_hf={model_dir!r} "
            f"({mine} differs from {Path(model_dir) / 'tokenizer.json'}): its ids would not be the model's; "
            f"prepare it with `python -m hpframe.data.prepare INPUT... --out DIR --tokenizer {model_dir}`"
        )


def _tokenizer_bytes(source: ShardedTokens) -> bytes:
    file = source.path / str(source.meta.get("tokenizer", "tokenizer.json"))
    return file.read_bytes() if file.is_file() else b""


def open_tokenized(cfg: RunConfig, path: str, key: str) -> ShardedTokens:
    """A tokenized dataset checked against the model: vocabulary size and (with model.from_hf) tokenizer."""
    if not path:
        raise DataError(f"data.kind=tokenized needs {key}=DIR (a directory written by `python -m hpframe.data.prepare`)")
    source = ShardedTokens(path)
    if cfg.model.vocab_size < source.vocab_size:
        raise DataError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer vocabulary of {key}="
            f"{path!r} ({source.vocab_size} tokens); set model.vocab_size>={source.vocab_size}"
        )
    _check_model_tokenizer(cfg, source, key)
    return source


def _discovered(inputs: list[str]) -> list[str]:
    from hpframe.data.sources import discover

    return [str(f.path) for f in discover(inputs)]


def ensure_prepared(cfg: RunConfig, rank: int) -> None:
    """``data.inputs``: rank 0 prepares ``data.path`` from them when it holds no dataset yet, with
    ``data.tokenizer``, else model.from_hf's tokenizer, else a BPE of ``model.vocab_size`` entries; every
    rank waits for it (data.path must be on a file system all ranks see). A dataset already there must
    have been prepared from the same input files."""
    import torch.distributed as dist

    from hpframe.data.dataset import META_FILE, read_meta
    from hpframe.data.prepare import prepare

    d = cfg.data
    if not d.inputs:
        return
    if d.kind != DataKind.tokenized or not d.path:
        raise DataError(f"data.inputs={list(d.inputs)} needs data.kind=tokenized and data.path=DIR to prepare them into")
    if rank == 0:
        out = Path(d.path)
        if (out / META_FILE).is_file():
            have, want = read_meta(out).get("sources"), _discovered(list(d.inputs))
            if have != want:
                raise DataError(
                    f"data.path={d.path!r} holds a dataset prepared from {have}, not from data.inputs ({want}); "
                    "choose another data.path or remove that one"
                )
        else:
            tokenizer = d.tokenizer or cfg.model.from_hf
            meta = prepare(list(d.inputs), out, tokenizer=Path(tokenizer) if tokenizer else None,
                           vocab_size=0 if tokenizer else cfg.model.vocab_size, field=d.text_field)
            print(f"prepared {meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens into {out}", flush=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()  # the others read data.path once rank 0 wrote it (or refused)


def build_source(cfg: RunConfig) -> tuple[TokenSource, str]:
    """The token stream selected by ``data.kind``, and a one-line description of it."""
    if cfg.data.kind == DataKind.synthetic:
        tokens = synthetic_corpus(cfg.data.num_synthetic_tokens, cfg.model.vocab_size, cfg.data.seed)
        return ArrayTokens(tokens), f"synthetic corpus, {tokens.shape[0]:,} tokens (seed {cfg.data.seed})"
    source = open_tokenized(cfg, cfg.data.path, "data.path")
    return source, f"tokenized shards in {cfg.data.path}, {source.num_tokens:,} tokens, vocab {source.vocab_size}"


def build_splits(cfg: RunConfig, source: TokenSource) -> tuple[SequenceSplit, SequenceSplit, str]:
    """(train, eval) splits: the held-out tail of ``source``, or all of it and all of ``data.eval_path``."""
    if not cfg.data.eval_path:
        train, evals = split_sequences(source, cfg.data.seq_len, cfg.data.eval_fraction)
        return train, evals, "held-out tail"
    if cfg.data.kind != DataKind.tokenized:
        raise DataError(f"data.eval_path={cfg.data.eval_path!r} needs data.kind=tokenized (the training data is synthetic)")
    eval_source = open_tokenized(cfg, cfg.data.eval_path, "data.eval_path")
    assert isinstance(source, ShardedTokens)
    if (eval_source.vocab_size, eval_source.eos_id) != (source.vocab_size, source.eos_id) or \
            _tokenizer_bytes(eval_source) != _tokenizer_bytes(source):
        raise DataError(
            f"data.eval_path={cfg.data.eval_path!r} (vocab {eval_source.vocab_size}, eos {eval_source.eos_id}) and "
            f"data.path={cfg.data.path!r} (vocab {source.vocab_size}, eos {source.eos_id}) come from different tokenizers"
        )
    return (all_sequences(source, cfg.data.seq_len, f"data.path={cfg.data.path!r}"),
            all_sequences(eval_source, cfg.data.seq_len, f"data.eval_path={cfg.data.eval_path!r}"),
            f"eval set {cfg.data.eval_path}")


def document_eos(cfg: RunConfig, source: TokenSource) -> int | None:
    """The id that closes a document when ``data.document_mask`` is on, else None."""
    if not cfg.data.document_mask:
        return None
    if isinstance(source, ShardedTokens):
        if source.eos_id is None:
            raise DataError(f"data.document_mask=true: {source.path / 'meta.json'} names no eos_id; re-prepare the dataset")
        return source.eos_id
    return SEPARATOR


def build_data(cfg: RunConfig, plan: "ParallelPlan", rank: int) -> Data:
    """Build the train loader and eval batches of ``rank`` (sharded by its dp coordinate)."""
    ensure_prepared(cfg, rank)
    source, description = build_source(cfg)
    train_split, eval_split, held_out = build_splits(cfg, source)
    dp_rank = plan.ranks.coords(rank)["dp"]
    loader = ShardedLoader(
        train_split, micro_batch_size=plan.micro_batch_size, grad_accum=plan.grad_accum,
        dp=plan.dp, dp_rank=dp_rank, seed=cfg.data.seed,
    )
    # train.eval_steps micro-batches in total, split over dp (rounded up to a multiple of dp): the same
    # held-out sequences for every layout when eval_steps is a multiple of dp. A pipelined engine
    # evaluates grad_accum micro-batches per call, so its share is rounded up to a multiple of that.
    num_eval = -(-cfg.train.eval_steps // plan.dp)
    if plan.pp > 1:
        num_eval = -(-num_eval // plan.grad_accum) * plan.grad_accum
    evals = eval_batches(eval_split, micro_batch_size=plan.micro_batch_size, num_batches=num_eval, dp=plan.dp, dp_rank=dp_rank)
    description += (f"; {train_split.num_sequences:,} train / {eval_split.num_sequences:,} eval sequences ({held_out}) "
                    f"of {cfg.data.seq_len}")
    eos = document_eos(cfg, source)
    if eos is not None:
        description += f"; document mask (documents end with id {eos})"
    return Data(loader, evals, train_split, eval_split, description, eos)


__all__ = ["Data", "DataError", "ShardedLoader", "build_data", "build_source", "ensure_prepared", "eval_batches", "split_sequences",
           "synthetic_corpus"]
