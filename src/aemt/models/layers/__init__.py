"""Attention and Transformer building blocks (plain and grouped)."""

from aemt.models.layers.attention import (
    BACKENDS,
    Dropout,
    GroupedLayerNorm,
    GroupedLinear,
    MultiHeadAttention,
    attention,
    dropout,
    layer_norm,
    linear,
    resolve_backend,
)
from aemt.models.layers.transformer import (
    CrossBlock,
    DecoderBlock,
    EncoderBlock,
    FeedForward,
    TransformerStack,
    embed_positions,
    sinusoidal_positions,
)

__all__ = [
    "BACKENDS", "Dropout", "dropout", "GroupedLayerNorm", "GroupedLinear", "MultiHeadAttention", "attention", "layer_norm",
    "linear", "resolve_backend", "CrossBlock", "DecoderBlock", "EncoderBlock", "FeedForward",
    "TransformerStack", "embed_positions", "sinusoidal_positions",
]
