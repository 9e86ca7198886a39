"""Pre-norm Transformer blocks (ReLU FFN of width 4·d, residual dropout), as in MulT.

Each block takes ``groups``: ``None`` builds ordinary ``nn.Linear``/``nn.LayerNorm`` layers and
works on ``(B, L, d)``; ``groups=G`` builds G independent weight sets and works on stacked inputs
``(G, B, L, d)`` in one batched computation. The grouped state dict indexed at ``[g]`` is the
state dict of the ungrouped block, so both compute the same function.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from aemt.models.layers.attention import AttnDropout, MultiHeadAttention
from aemt.models.layers.grouped import layer_norm, linear, norm_linear
from aemt.models.layers.dropout import Dropout


def sinusoidal_positions(length: int, d: int, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """Fixed sinusoidal position table (length, d): sin on even, cos on odd features."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(length, d, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return table.to(dtype)


def take_steps(x: Tensor, index: Tensor) -> Tensor:
    """The steps ``index`` (...,) of ``x`` (..., L, d), one per row -> (..., 1, d)."""
    return x.gather(-2, index[..., None, None].expand(*x.shape[:-2], 1, x.shape[-1]))


_POSITION_TABLES: dict[tuple, Tensor] = {}


def _position_table(x: Tensor) -> Tensor:
    """:func:`sinusoidal_positions` for ``x`` (..., L, d), made once per shape, device and dtype
    (building it is ~10 operator calls, each a kernel launch on a GPU); made afresh under
    ``torch.compile`` and for tensor subclasses (e.g. fake tensors), so nothing traced is cached."""
    (length, d), device, dtype = x.shape[-2:], x.device, x.dtype
    if torch.compiler.is_compiling() or type(x) is not Tensor:
        return sinusoidal_positions(length, d, device, dtype)
    key = (length, d, device, dtype)
    if key not in _POSITION_TABLES:
        with torch.inference_mode(False):  # a normal tensor, usable in training after an inference call
            _POSITION_TABLES[key] = sinusoidal_positions(length, d, device, dtype)
    return _POSITION_TABLES[key]


def embed_positions(x: Tensor, dtype: torch.dtype | None = None, positions: bool = True) -> Tensor:
    """MulT's input stage: ``sqrt(d) · x + positions`` for ``x`` of shape (..., L, d) (``positions=False``:
    ``sqrt(d) · x``, as MMSA 2.2.1's MulT, which adds none).

    ``dtype``: the residual stream's dtype, the model's parameter dtype (float32 unless the run is
    ``*-true``); ``x`` is cast to it first. Under autocast a convolution's output is bf16/fp16,
    and becomes float32 here, so the blocks that follow sum along a float32 stream, as they do
    without autocast: only the layers' matmuls run in the lower precision. (Decided by dtypes, not
    by asking torch whether autocast is on: not every torch version can trace that query, and an
    untraceable call splits a compiled graph.)"""
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    scaled = math.sqrt(x.shape[-1]) * x
    return scaled + _position_table(x) if positions else scaled


class FeedForward(nn.Module):
    """Position-wise ``Linear(d, 4d) → ReLU → Dropout → Linear(4d, d)``."""

    def __init__(self, d: int, dropout: float, groups: int | None = None) -> None:
        super().__init__()
        self.fc1 = linear(d, 4 * d, groups)
        self.fc2 = linear(4 * d, d, groups)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, norm: nn.Module | None = None) -> Tensor:
        """``FFN(x)``, or ``FFN(norm(x))`` with ``norm`` applied with ``fc1`` (:func:`norm_linear`)."""
        return self.fc2(self.drop(torch.relu(norm_linear(norm, self.fc1, x))))


class _Block(nn.Module):
    """Common parts: a FFN sub-layer with its pre-norm, and residual dropout.

    Blocks take ``dropout`` (residual), ``ffn_dropout`` (inside the FFN; None: ``dropout``) and
    ``attn_dropout`` (attention weights; with ``groups``, one rate or one rate per group);
    encoder and cross-modal blocks also ``causal`` (MulT's future mask on the attention).
    """

    def __init__(self, d: int, dropout: float, groups: int | None, ffn_dropout: float | None) -> None:
        super().__init__()
        self.norm_ff = layer_norm(d, groups)
        self.ffn = FeedForward(d, dropout if ffn_dropout is None else ffn_dropout, groups)
        self.drop = Dropout(dropout)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return x + self.drop(self.ffn(x, norm=self.norm_ff))


class EncoderBlock(_Block):
    """``x + SelfAttn(LN(x))`` then ``x + FFN(LN(x))``; keys masked by ``valid`` (B, L)."""

    def __init__(self, d: int, heads: int, dropout: float = 0.1, attn_dropout: AttnDropout = 0.1,
                 backend: str = "auto", groups: int | None = None, ffn_dropout: float | None = None,
                 causal: bool = False) -> None:
        super().__init__(d, dropout, groups, ffn_dropout)
        self.norm_attn = layer_norm(d, groups)
        self.attn = MultiHeadAttention(d, heads, attn_dropout, backend, cross=False, groups=groups, causal=causal)

    def forward(self, x: Tensor, valid: Tensor | None, query_index: Tensor | None = None) -> Tensor:
        """(..., L, d) -> (..., L, d); with ``query_index`` (..., long) only those steps: (..., 1, d)."""
        h = self.attn(x, valid, query_index=query_index, norms=(self.norm_attn,))
        if query_index is not None:
            x = take_steps(x, query_index)
        x = x + self.drop(h)
        return self._feed_forward(x)


class CrossBlock(_Block):
    """MulT's cross-modal block: the target ``x`` queries the source ``src`` (keys and values).

    ``x + CrossAttn(LN_q(x), LN_kv(src))`` then ``x + FFN(LN(x))``; ``src_valid`` masks the
    source frames. (MulT shares one LayerNorm for query and source; we give each its own, as
    the two come from different modalities.)
    """

    def __init__(self, d: int, heads: int, dropout: float = 0.1, attn_dropout: AttnDropout = 0.1,
                 backend: str = "auto", groups: int | None = None, ffn_dropout: float | None = None,
                 causal: bool = False) -> None:
        super().__init__(d, dropout, groups, ffn_dropout)
        self.norm_q = layer_norm(d, groups)
        self.norm_kv = layer_norm(d, groups)
        self.attn = MultiHeadAttention(d, heads, attn_dropout, backend, cross=True, groups=groups, causal=causal)

    def forward(self, x: Tensor, src: Tensor, src_valid: Tensor | None,
                future_offsets: Sequence[int] | None = None) -> Tensor:
        """``future_offsets``: per-group offsets of the future mask (see :func:`attention`)."""
        x = x + self.drop(self.attn(x, src_valid, source=src, norms=(self.norm_q, self.norm_kv),
                                    future_offsets=future_offsets))
        return self._feed_forward(x)


class DecoderBlock(_Block):
    """Self-attention over the queries, cross-attention to ``memory``, then FFN (all pre-norm)."""

    def __init__(self, d: int, heads: int, dropout: float = 0.1, attn_dropout: AttnDropout = 0.1,
                 backend: str = "auto", groups: int | None = None, ffn_dropout: float | None = None) -> None:
        super().__init__(d, dropout, groups, ffn_dropout)
        self.norm_self = layer_norm(d, groups)
        self.self_attn = MultiHeadAttention(d, heads, attn_dropout, backend, cross=False, groups=groups)
        self.norm_cross = layer_norm(d, groups)
        self.cross_attn = MultiHeadAttention(d, heads, attn_dropout, backend, cross=True, groups=groups)

    def forward(self, x: Tensor, valid: Tensor | None, memory: Tensor, memory_valid: Tensor | None) -> Tensor:
        x = x + self.drop(self.self_attn(x, valid, norms=(self.norm_self,)))
        x = x + self.drop(self.cross_attn(x, memory_valid, source=memory, norms=(self.norm_cross,)))
        return self._feed_forward(x)


class TransformerStack(nn.Module):
    """``layers`` blocks made by ``make_block`` applied in turn, then an optional final LayerNorm.

    ``forward(x, *args, **options)`` passes the extra arguments (masks, source, memory) and keyword
    options to every block.
    """

    def __init__(self, make_block: Callable[[], nn.Module], layers: int, d: int,
                 groups: int | None = None, final_norm: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(make_block() for _ in range(layers))
        self.norm = layer_norm(d, groups) if final_norm else nn.Identity()

    def forward(self, x: Tensor, *args: Tensor | None, query_index: Tensor | None = None, **options) -> Tensor:
        """With ``query_index`` (leading dims of ``x``, long) the last block computes only those
        steps (its keys and values still cover every step) and the output is (..., 1, d): the
        same values as the full output at those steps, for less work."""
        last = {} if query_index is None else {"query_index": query_index}
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, *args, **options, **(last if i == len(self.blocks) else {}))
        if query_index is not None and not self.blocks:
            x = take_steps(x, query_index)
        return self.norm(x)
