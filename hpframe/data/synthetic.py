"""A built-in synthetic corpus with learnable structure, generated from a seed (no download).

The corpus is a sequence of fixed-length documents, each opened by the separator token 0. A
document is one of three kinds, chosen at random:

* ``markov``: a walk on a random sparse Markov chain over the active symbols; every symbol has two
  successors, taken with probability 0.85 and 0.15 (0.42 nats per token once the table is learnt);
* ``count``: an arithmetic progression ``start + stride * i`` modulo the number of active symbols;
* ``repeat``: a random phrase of 3-12 symbols repeated to the end of the document (induction).

Only ``min(vocab_size - 1, 256)`` symbols are used, so a model first learns which tokens never occur
(the loss falls by about ln(vocab / 256); with train=smoke on mixtral_debug that takes about ten
steps) and then the local structure.
Generation is vectorized over documents; one million tokens take well under a second.
"""

from __future__ import annotations

import numpy as np

from hpframe.errors import UserError

SEPARATOR = 0
"""Token that opens every synthetic document."""
DOC_LEN = 256
"""Tokens per document, separator included."""
MAX_ACTIVE_SYMBOLS = 256
KINDS = ("markov", "count", "repeat")


def num_active_symbols(vocab_size: int) -> int:
    """Symbols 1..A that documents use (token 0 is the separator)."""
    return min(vocab_size - 1, MAX_ACTIVE_SYMBOLS)


def synthetic_corpus(num_tokens: int, vocab_size: int, seed: int) -> np.ndarray:
    """Return ``num_tokens`` int32 token ids in [0, vocab_size), a pure function of its arguments."""
    if vocab_size < 3:
        raise UserError(f"model.vocab_size={vocab_size}: the synthetic corpus needs at least 3 tokens")
    if num_tokens < DOC_LEN:
        raise UserError(f"data.num_synthetic_tokens={num_tokens}: need at least one document of {DOC_LEN} tokens")
    rng = np.random.default_rng([seed, 0x5EED])
    num_active = num_active_symbols(vocab_size)
    num_docs = -(-num_tokens // DOC_LEN)
    body = DOC_LEN - 1
    kind = rng.integers(0, len(KINDS), size=num_docs)
    docs = np.empty((num_docs, body), dtype=np.int64)  # symbols in [0, num_active), shifted by 1 below

    # markov: successor table [A, 2]; each step takes successor 0 with p=0.85
    table = rng.integers(0, num_active, size=(num_active, 2))
    state = rng.integers(0, num_active, size=num_docs)
    choice = (rng.random((num_docs, body)) >= 0.85).astype(np.int64)
    markov = np.empty((num_docs, body), dtype=np.int64)
    for i in range(body):
        markov[:, i] = state
        state = table[state, choice[:, i]]

    # count: start + stride * i (mod A)
    start = rng.integers(0, num_active, size=(num_docs, 1))
    stride = rng.choice(np.array([1, 2, 3, 5]), size=(num_docs, 1))
    count = (start + stride * np.arange(body)[None, :]) % num_active

    # repeat: phrase of length m tiled; position i takes phrase[i % m]
    length = rng.integers(3, 13, size=(num_docs, 1))
    phrase = rng.integers(0, num_active, size=(num_docs, 12))
    repeat = np.take_along_axis(phrase, np.arange(body)[None, :] % length, axis=1)

    docs[:] = np.where((kind == 0)[:, None], markov, np.where((kind == 1)[:, None], count, repeat))
    out = np.empty((num_docs, DOC_LEN), dtype=np.int32)
    out[:, 0] = SEPARATOR
    out[:, 1:] = docs + 1
    return out.reshape(-1)[:num_tokens]
