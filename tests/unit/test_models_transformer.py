"""Transformer assembly on CPU: the debug recipes build on the meta device and materialize to the
same weights as a direct build with the same seed; layer kinds follow the config; forward/backward
run and aux_loss is a scalar with grad. Compared with: direct builds and the config rules."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from hpframe.config.convert import to_run_config
from hpframe.config.schema import RunConfig
from hpframe.config.store import CONF_DIR, register_configs
from hpframe.models import MoE, build_model, is_moe_layer
from hpframe.models.layers import MLP

RECIPES = ["mixtral_debug", "deepseek_debug", "gpt_debug"]


def compose_run(*overrides: str) -> RunConfig:
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize("recipe", RECIPES)
def test_meta_build_then_init_equals_direct_build(recipe: str) -> None:
    cfg = compose_run(f"recipe={recipe}")
    with torch.device("meta"):
        meta = build_model(cfg.model, cfg.moe)
    assert all(p.is_meta for p in meta.parameters())
    meta.to_empty(device="cpu")
    meta.init_weights(seed=7)
    direct = build_model(cfg.model, cfg.moe)
    direct.init_weights(seed=7)
    sd_a, sd_b = meta.state_dict(), direct.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    # Non-persistent buffers (rotary tables, load counters) are re-initialized too.
    bufs_a, bufs_b = dict(meta.named_buffers()), dict(direct.named_buffers())
    for k in bufs_a:
        assert torch.equal(bufs_a[k], bufs_b[k]), k
    other = build_model(cfg.model, cfg.moe)
    other.init_weights(seed=8)
    assert not torch.equal(other.embed.weight, direct.embed.weight)


@pytest.mark.parametrize("recipe", ["mixtral_debug", "deepseek_debug"])
def test_threaded_init_equals_sequential(recipe: str) -> None:
    """Large models draw their tensors on a thread pool: same values as drawing them one by one."""
    cfg = compose_run(f"recipe={recipe}")
    one, many = build_model(cfg.model, cfg.moe), build_model(cfg.model, cfg.moe)
    one._init_weights(3, workers=1)
    import hpframe.models.transformer as tr

    old, tr.PARALLEL_INIT_MIN_ELEMENTS = tr.PARALLEL_INIT_MIN_ELEMENTS, 0  # force the pool on a debug model
    try:
        many._init_weights(3, workers=4)
    finally:
        tr.PARALLEL_INIT_MIN_ELEMENTS = old
    for (k, a), (_, b) in zip(one.state_dict().items(), many.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("recipe", RECIPES)
def test_forward_backward_and_layer_kinds(recipe: str) -> None:
    cfg = compose_run(f"recipe={recipe}")
    model = build_model(cfg.model, cfg.moe)
    model.init_weights(seed=0)
    kinds = [isinstance(b.mlp, MoE) for b in model.layers]
    assert kinds == [is_moe_layer(i, cfg.model, cfg.moe) for i in range(cfg.model.num_layers)]
    assert all(isinstance(b.mlp, MLP) for b, k in zip(model.layers, kinds) if not k)
    assert (model.head is None) == cfg.model.tie_embeddings
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, cfg.model.vocab_size)
    assert model.aux_loss.shape == ()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + model.aux_loss
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    if any(kinds) and (cfg.moe.aux_loss_coef > 0 or cfg.moe.seq_aux_loss_coef > 0):
        assert model.aux_loss.requires_grad and float(model.aux_loss.detach()) > 0
    if not any(kinds):
        assert float(model.aux_loss) == 0.0


def test_moe_layer_pattern() -> None:
    cfg = compose_run("recipe=deepseek_debug", "model.num_layers=7", "model.first_k_dense=2", "moe.moe_layer_freq=2")
    model = build_model(cfg.model, cfg.moe)
    assert [isinstance(b.mlp, MoE) for b in model.layers] == [False, False, True, False, True, False, True]
    assert len(model.moe_modules()) == 3


def test_causal_logits_do_not_see_the_future() -> None:
    cfg = compose_run("recipe=mixtral_debug", "model.num_layers=2")
    model = build_model(cfg.model, cfg.moe)
    model.init_weights(seed=1)
    model.eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % cfg.model.vocab_size
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("moe.top_k=9", "moe.top_k=9"),
        ("moe.num_expert_groups=3", "moe.num_experts=8 must be divisible"),
        ("model.num_heads=3", "model.hidden_size=128 is not divisible by model.num_heads=3"),
    ],
)
def test_invalid_shapes_raise_value_error(override: str, message: str) -> None:
    cfg = compose_run("recipe=mixtral_debug", override)
    with pytest.raises(ValueError, match=message):
        build_model(cfg.model, cfg.moe)


def test_sequence_longer_than_rotary_tables_raises() -> None:
    cfg = compose_run("recipe=gpt_debug", "model.max_seq_len=8", "model.num_layers=1")
    model = build_model(cfg.model, cfg.moe)
    model.init_weights(seed=0)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
