"""Data: the synthetic corpus and the dp-sharded loader, compared with a single-process reference.

Determinism (same seed -> same tokens and batches), the sharding rule (the union over dp ranks of one
step's micro-batches is the single-process global batch, in the same order, for several layouts),
resume (state_dict/load_state_dict continues with the next unseen batch) and the held-out split.
CPU only, no processes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpframe.data.dataset import ArrayTokens, split_sequences
from hpframe.data.loader import ShardedLoader, eval_batches
from hpframe.data.synthetic import DOC_LEN, SEPARATOR, num_active_symbols, synthetic_corpus

VOCAB, SEQ = 2048, 32


@pytest.fixture(scope="module")
def splits():
    return split_sequences(ArrayTokens(synthetic_corpus(40_000, VOCAB, seed=7)), SEQ, eval_fraction=0.05)


def test_synthetic_corpus_is_deterministic_and_in_range():
    a = synthetic_corpus(10_000, VOCAB, seed=3)
    b = synthetic_corpus(10_000, VOCAB, seed=3)
    c = synthetic_corpus(10_000, VOCAB, seed=4)
    assert a.shape == (10_000,) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() == 0 and a.max() <= num_active_symbols(VOCAB)
    assert (a[::DOC_LEN] == SEPARATOR).all()


def test_synthetic_corpus_has_low_conditional_entropy():
    """Next-token entropy given the previous token (bigram) is far below the unigram entropy: learnable."""
    toks = synthetic_corpus(200_000, VOCAB, seed=0).astype(np.int64)
    a = num_active_symbols(VOCAB) + 1
    joint = np.bincount(toks[:-1] * a + toks[1:], minlength=a * a).reshape(a, a).astype(float)
    p_joint = joint / joint.sum()
    p_prev = p_joint.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h_cond = -np.nansum(p_joint * np.log(p_joint / p_prev))
    p_uni = p_joint.sum(0)
    h_uni = -np.sum(p_uni[p_uni > 0] * np.log(p_uni[p_uni > 0]))
    assert h_uni > 5.0  # ~ln(256): the symbols are used roughly uniformly
    assert h_cond < 0.6 * h_uni


def test_synthetic_corpus_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="model.vocab_size=2"):
        synthetic_corpus(1000, 2, seed=0)


def test_split_sequences_tail_is_eval_and_sequences_overlap_by_one(splits):
    train, evals = splits
    total = (40_000 - 1) // SEQ
    assert train.num_sequences + evals.num_sequences == total
    assert evals.num_sequences == int(total * 0.05) and evals.first == train.num_sequences
    s0, s1 = train[0], train[1]
    assert s0.shape == (SEQ + 1,) and s0[-1] == s1[0]  # last target of one sequence = first input of the next
    tokens = synthetic_corpus(40_000, VOCAB, seed=7)
    assert np.array_equal(evals[0], tokens[train.num_sequences * SEQ : train.num_sequences * SEQ + SEQ + 1])


@pytest.mark.parametrize("dp,grad_accum", [(1, 4), (2, 2), (4, 1)])
def test_union_over_dp_equals_single_process_global_batch(splits, dp, grad_accum):
    """dp x grad_accum micro-batches of 3 sequences, concatenated rank by rank == the single-process steps."""
    train, _ = splits
    mbs, steps = 3, 5
    single = ShardedLoader(train, micro_batch_size=mbs, grad_accum=dp * grad_accum, dp=1, dp_rank=0, seed=11)
    ranks = [ShardedLoader(train, micro_batch_size=mbs, grad_accum=grad_accum, dp=dp, dp_rank=d, seed=11) for d in range(dp)]
    for _ in range(steps):
        ref = single.next_step()
        got = [mb for loader in ranks for mb in loader.next_step()]
        assert len(got) == len(ref) == dp * grad_accum
        for a, b in zip(got, ref):
            assert a.dtype == torch.int64 and a.shape == (mbs, SEQ + 1)
            assert torch.equal(a, b)
    # different dp ranks see disjoint sequences within a step (no duplicated samples in an epoch)
    idx = np.concatenate([np.concatenate(loader.step_indices(0)) for loader in ranks])
    assert len(set(idx.tolist())) == len(idx)


def test_epochs_cover_every_sequence_once_then_reshuffle(splits):
    train, _ = splits
    loader = ShardedLoader(train, micro_batch_size=1, grad_accum=1, dp=1, dp_rank=0, seed=5)
    n = train.num_sequences
    first = loader.sequence_indices(0, n)
    second = loader.sequence_indices(n, n)
    assert sorted(first.tolist()) == list(range(n)) == sorted(second.tolist())
    assert not np.array_equal(first, second)
    other_seed = ShardedLoader(train, micro_batch_size=1, grad_accum=1, dp=1, dp_rank=0, seed=6).sequence_indices(0, n)
    assert not np.array_equal(first, other_seed)


def test_resume_continues_with_next_unseen_batch(splits):
    train, _ = splits
    kw = dict(micro_batch_size=2, grad_accum=2, dp=2, dp_rank=1, seed=9)
    a = ShardedLoader(train, **kw)
    for _ in range(3):
        a.next_step()
    state = a.state_dict()
    expected = a.next_step()
    b = ShardedLoader(train, **kw)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(b.next_step(), expected))
    c = ShardedLoader(train, **{**kw, "seed": 10})
    with pytest.raises(ValueError, match="seed"):
        c.load_state_dict(state)


def test_eval_batches_fixed_and_sharded(splits):
    _, evals = splits
    r0 = eval_batches(evals, micro_batch_size=4, num_batches=2, dp=2, dp_rank=0)
    r1 = eval_batches(evals, micro_batch_size=4, num_batches=2, dp=2, dp_rank=1)
    assert torch.equal(r0[0][0], torch.from_numpy(evals[0])) and torch.equal(r1[0][0], torch.from_numpy(evals[8]))
    again = eval_batches(evals, micro_batch_size=4, num_batches=2, dp=2, dp_rank=0)
    assert all(torch.equal(x, y) for x, y in zip(r0, again))
