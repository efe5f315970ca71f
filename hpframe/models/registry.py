"""Architecture name -> model class. Every family is one Transformer whose parts the config picks."""

from __future__ import annotations

from hpframe.config.schema import Arch
from hpframe.models.transformer import Transformer

MODEL_CLASSES: dict[Arch, type[Transformer]] = {
    Arch.gpt: Transformer,
    Arch.mixtral: Transformer,
    Arch.deepseek_v3: Transformer,
    Arch.qwen3_moe: Transformer,
}


def model_class(arch: Arch | str) -> type[Transformer]:
    """The class that implements ``arch``; ValueError names the known ones."""
    try:
        return MODEL_CLASSES[Arch(arch)]
    except ValueError:
        raise ValueError(f"model.arch={arch!r} is not one of {[a.value for a in Arch]}") from None
