"""Packed documents: the position ids that keep attention and rotary inside each document.

Sequences are cut from one token stream in which documents follow each other, each closed by the
end-of-sequence id (``hpframe.data.prepare``; the synthetic corpus opens its documents with token 0,
which plays that role). With ``data.document_mask`` every micro-batch carries ``positions`` [B,S]:
the index of each token inside its document, restarting at 0 on the token after an EOS and at the
start of the sequence (a document cut by the sequence start begins there). The model derives the
block-diagonal causal mask from them (``hpframe.models.layers.document_attention_mask``). The EOS
closes its own document; its target (the next document's first token) is still trained, as in
packing without the mask.
"""

from __future__ import annotations

import torch


def document_positions(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """int64 [B,S]: position of every token of ``tokens`` [B,S] inside its document."""
    b, s = tokens.shape
    starts = torch.zeros(b, s, dtype=torch.bool, device=tokens.device)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eos_id
    index = torch.arange(s, device=tokens.device).expand(b, s)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # start of each token's document
    return index - first


def model_inputs(batches: list[torch.Tensor], eos_id: int | None) -> list[tuple]:
    """Sequences [B,S+1] -> the engine's micro-batches ``(inputs, targets [B,S])``.

    ``inputs`` is tokens [B,S], or ``(tokens, positions)`` with ``eos_id`` set (``data.document_mask``).
    """
    out = []
    for b in batches:
        tokens, targets = b[:, :-1], b[:, 1:]
        out.append(((tokens, document_positions(tokens, eos_id)) if eos_id is not None else tokens, targets))
    return out
