"""Attention and Transformer building blocks (plain and grouped)."""

from aemt.models.layers.attention import BACKENDS, AttnDropout, MultiHeadAttention, attention, resolve_backend, subset_of_groups
from aemt.models.layers.grouped import GroupedLayerNorm, GroupedLinear, layer_norm, linear, norm_linear
from aemt.models.layers.dropout import Dropout, dropout
from aemt.models.layers.transformer import (
    CrossBlock,
    DecoderBlock,
    EncoderBlock,
    FeedForward,
    TransformerStack,
    embed_positions,
    sinusoidal_positions,
    take_steps,
)

__all__ = [
    "BACKENDS", "AttnDropout", "Dropout", "dropout", "GroupedLayerNorm", "GroupedLinear", "MultiHeadAttention", "attention", "layer_norm",
    "linear", "norm_linear", "resolve_backend", "subset_of_groups", "CrossBlock", "DecoderBlock", "EncoderBlock", "FeedForward",
    "TransformerStack", "embed_positions", "sinusoidal_positions", "take_steps",
]
