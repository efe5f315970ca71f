"""data.document_mask: packed documents compute what each document computes alone.

Three documents (each closed by EOS) packed into one sequence, two rows, run through the model with
``document_positions``; their per-token logits are compared with separate forwards of each document,
for GQA (mixtral_debug, MoE) and MLA (deepseek_debug, MoE) in fp32 on CPU, within 2e-5 of the logits'
scale. Without the mask the later documents' logits differ (so the check can fail), the first's do
not. Also the positions and the mask on a hand-made example. Single process; multi-process layouts
(pp=2 training, tp=2 with sequence parallelism) are compared in tests/e2e/test_evaluate.py.
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from hpframe.config.convert import to_run_config
from hpframe.config.store import CONF_DIR, register_configs
from hpframe.data.packing import document_positions, model_inputs
from hpframe.models import build_model
from hpframe.models.layers import document_attention_mask

EOS = 3


def packed_documents(vocab: int, lengths=(7, 12, 9), seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """tokens [2, sum(lengths)] (two rows, different documents) and the documents of each row."""
    gen = torch.Generator().manual_seed(seed)
    rows, docs = [], []
    for _ in range(2):
        row_docs = []
        for n in lengths:
            d = torch.randint(EOS + 1, vocab, (n,), generator=gen)
            d[-1] = EOS
            row_docs.append(d)
        rows.append(torch.cat(row_docs))
        docs.append(row_docs)
    return torch.stack(rows), docs


def test_positions_and_mask_by_hand():
    tokens = torch.tensor([[5, 6, EOS, 7, EOS, 8, 9, 9]])
    pos = document_positions(tokens, EOS)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    mask = document_attention_mask(pos)[0, 0].int()
    assert mask[4].tolist() == [0, 0, 0, 1, 1, 0, 0, 0] and mask[7].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    (inputs, targets), = model_inputs([torch.tensor([[5, 6, EOS, 7, 8]])], EOS)
    assert inputs[0].tolist() == [[5, 6, EOS, 7]] and inputs[1].tolist() == [[0, 1, 2, 0]] and targets.tolist() == [[6, EOS, 7, 8]]
    (plain, _), = model_inputs([torch.tensor([[5, 6, EOS, 7, 8]])], None)
    assert plain.tolist() == [[5, 6, EOS, 7]]


@pytest.mark.parametrize("recipe", ["mixtral_debug", "deepseek_debug"])
def test_packed_logits_equal_separate_documents(recipe: str) -> None:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = to_run_config(compose("config", overrides=[f"recipe={recipe}", "model.num_layers=2"]))
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.moe)
    model.init_weights(seed=11)
    model.eval()
    tokens, docs = packed_documents(cfg.model.vocab_size)
    with torch.no_grad():
        packed = model(tokens, document_positions(tokens, EOS))
        unmasked = model(tokens)
        alone = torch.stack([torch.cat([model(d[None])[0] for d in row]) for row in docs])
    scale = alone.abs().max().item()
    assert (packed - alone).abs().max().item() <= 2e-5 * scale
    first = len(docs[0][0])
    assert (unmasked[:, :first] - alone[:, :first]).abs().max().item() <= 2e-5 * scale  # first document: same either way
    assert (unmasked[:, first:] - alone[:, first:]).abs().max().item() > 1e-2 * scale
