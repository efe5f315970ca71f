"""Single-device model code: dense GPT, Mixtral-like and DeepSeek-V3-like transformers."""

from hpframe.models.moe import MoE, GroupedExperts, Router
from hpframe.models.transformer import Block, Transformer, build_model, is_moe_layer

__all__ = ["Block", "GroupedExperts", "MoE", "Router", "Transformer", "build_model", "is_moe_layer"]
