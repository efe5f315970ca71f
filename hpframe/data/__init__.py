"""Training data: the synthetic corpus, tokenized shards, and the dp-sharded loader.

``build_data(cfg, plan, rank)`` is the one call ``hpframe.run`` makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hpframe.config.schema import DataKind, RunConfig
from hpframe.data.dataset import ArrayTokens, SequenceSplit, ShardedTokens, TokenSource, split_sequences
from hpframe.data.loader import ShardedLoader, eval_batches
from hpframe.data.synthetic import synthetic_corpus
from hpframe.errors import UserError

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


def build_source(cfg: RunConfig) -> tuple[TokenSource, str]:
    """The token stream selected by ``data.kind``, and a one-line description of it."""
    if cfg.data.kind == DataKind.synthetic:
        tokens = synthetic_corpus(cfg.data.num_synthetic_tokens, cfg.model.vocab_size, cfg.data.seed)
        return ArrayTokens(tokens), f"synthetic corpus, {tokens.shape[0]:,} tokens (seed {cfg.data.seed})"
    if not cfg.data.path:
        raise UserError("data.kind=tokenized needs data.path=DIR (a directory written by `python -m hpframe.data.prepare`)")
    source = ShardedTokens(cfg.data.path)
    if cfg.model.vocab_size < source.vocab_size:
        raise UserError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer vocabulary of data.path="
            f"{cfg.data.path!r} ({source.vocab_size} tokens); set model.vocab_size>={source.vocab_size}"
        )
    return source, f"tokenized shards in {cfg.data.path}, {source.num_tokens:,} tokens, vocab {source.vocab_size}"


def build_data(cfg: RunConfig, plan: "ParallelPlan", rank: int) -> Data:
    """Build the train loader and eval batches of ``rank`` (sharded by its dp coordinate)."""
    source, description = build_source(cfg)
    train_split, eval_split = split_sequences(source, cfg.data.seq_len, cfg.data.eval_fraction)
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
    description += f"; {train_split.num_sequences:,} train / {eval_split.num_sequences:,} eval sequences of {cfg.data.seq_len}"
    return Data(loader, evals, train_split, eval_split, description)


__all__ = ["Data", "ShardedLoader", "build_data", "build_source", "eval_batches", "split_sequences", "synthetic_corpus"]
