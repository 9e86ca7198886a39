"""Attention and Transformer building blocks (plain and grouped)."""

from aemt.models.layers.attention import (
    BACKENDS,
    AttnDropout,
    GroupedLayerNorm,
    GroupedLinear,
    MultiHeadAttention,
    attention,
    layer_norm,
    linear,
    resolve_backend,
    subset_of_groups,
)
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
    "linear", "resolve_backend", "subset_of_groups", "CrossBlock", "DecoderBlock", "EncoderBlock", "FeedForward",
    "TransformerStack", "embed_positions", "sinusoidal_positions", "take_steps",
]
