"""Scaled dot-product attention behind one small function, and multi-head attention.

Two kernels compute the same thing (a test checks that they agree):

* ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels);
* ``"math"``: plain ``softmax(q @ kᵀ · scale + mask) @ v`` (:mod:`~aemt.models.layers.math_kernel`).

``"auto"`` picks SDPA on CUDA or for head dims >= 16, the plain path otherwise: on the CPU the
fused kernel is slow for the tiny heads of MulT (head dim 5), see ``shared/perf-notes.md``.

Every layer here also works *grouped*: with ``groups=G`` the projections are
:class:`GroupedLinear` layers holding G independent weight sets, inputs carry a leading group
dim ``(G, B, L, d)``, and one attention call runs on ``(G·B, H, L, hd)``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aemt.models.layers.grouped import linear, norm_linear
from aemt.models.layers.math_kernel import AttnDropout, future_allowed, math_attention, row_runs

BACKENDS = ("auto", "sdpa", "math")
_SDPA_MIN_HEAD_DIM = 16
_CUDA_HEAD_DIM_ALIGN = 8  # see _sdpa
_PADDED_DEVICES = ("cuda",)  # where SDPA's head dims are zero-padded to _CUDA_HEAD_DIM_ALIGN
_pad_heads = True  # False within unpadded_heads()


def resolve_backend(backend: str, q: Tensor) -> str:
    """The concrete kernel (``"sdpa"`` or ``"math"``) that ``backend`` means for ``q``.

    While ``torch.compile`` traces, always ``"sdpa"``: the math kernel draws its dropout with numpy,
    which the compiler cannot trace, and the compiler fuses SDPA's plain formula itself."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if torch.compiler.is_compiling():
        return "sdpa"
    if backend == "auto":
        return "sdpa" if q.is_cuda or q.shape[-1] >= _SDPA_MIN_HEAD_DIM else "math"
    return backend


def attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None,
              dropout_p: AttnDropout = 0.0, backend: str = "auto", causal: bool = False,
              future_offsets: Sequence[int] | None = None, groups: int | None = None) -> Tensor:
    """Multi-head scaled dot-product attention with a key padding mask (and MulT's future mask).

    Args:
        q: queries (B, H, Lq, hd); k, v: keys and values (B, H, Lk, hd).
        key_valid: (B, Lk) bool, True where the key is a valid frame; None: all valid.
        dropout_p: dropout on the attention weights (pass 0 in eval mode); a sequence gives one
            rate per group of consecutive batch rows (B must be a multiple of its length).
        backend: ``"auto"``, ``"sdpa"`` or ``"math"``.
        causal: also mask the "future" keys, see :func:`future_allowed`.
        future_offsets: with ``causal``, one future-mask offset per group of consecutive batch rows
            (for groups padded to a common length: the offsets of their true lengths); None:
            ``|Lk - Lq|`` for every row.
        groups: the batch rows are this many equal groups of consecutive rows (grouped layers;
            default: one, or one per entry of a per-group sequence); off the GPU the math kernel
            leaves out the keys that are padding in every row of a group.
    Returns:
        (B, H, Lq, hd).
    """
    Lq, Lk = q.shape[-2], k.shape[-2]
    offsets = None if not causal else abs(Lk - Lq) if future_offsets is None else list(future_offsets)
    if resolve_backend(backend, q) == "math":
        read_mask = key_valid is not None and not q.is_cuda  # a host sync only off the GPU
        runs = row_runs(q.shape[0], dropout_p, offsets, groups, key_valid if read_mask else None)
        return math_attention(q, k, v, key_valid, runs)
    runs = row_runs(q.shape[0], dropout_p, offsets, groups)
    align = _CUDA_HEAD_DIM_ALIGN if _pad_heads and q.device.type in _PADDED_DEVICES else 1
    out = []
    for a, b, p, off, *_ in runs:
        mask = None if key_valid is None else key_valid[a:b, None, None, :]  # (b - a, 1, 1, Lk)
        if off is not None:
            allowed = future_allowed(Lq, Lk, q.device, off)  # (Lq, Lk), broadcast over rows and heads
            mask = allowed if mask is None else mask & allowed
        out.append(_sdpa(q[a:b], k[a:b], v[a:b], mask, p, align))
    return out[0] if len(out) == 1 else torch.cat(out)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, p: float, align: int = 1) -> Tensor:
    """``F.scaled_dot_product_attention`` with the head dim zero-padded to a multiple of ``align``.

    CUDA's fused kernel for masked attention (memory-efficient) needs head dims divisible by 8
    (bf16) or 4 (fp32); MulT's heads of 5 would fall back to the unfused formula: ~10 kernels
    forward and more backward per call, and the (B, H, Lq, Lk) weights in memory. Zero columns
    leave ``q kᵀ`` unchanged and give zero output columns, which are cut off; the scale stays
    that of the true head dim.
    """
    hd = q.shape[-1]
    pad = -hd % align
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0 / math.sqrt(hd))
    return out[..., :hd] if pad else out


@contextmanager
def unpadded_heads() -> Iterator[None]:
    """Within the block SDPA runs on the true head dims on CUDA too (no zero-padding, see
    :func:`_sdpa`): for counting a model's FLOPs, which padded heads inflate (8 columns for 5)."""
    global _pad_heads
    before, _pad_heads = _pad_heads, False
    try:
        yield
    finally:
        _pad_heads = before


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a fused projection: ``qkv`` (self) or ``q`` + ``kv`` (cross).

    Inputs are ``(..., L, d)``: ``(B, L, d)``, or ``(G, B, L, d)`` when ``groups=G``; all leading
    dims are folded into the attention batch. ``key_valid`` has the leading dims of the keys
    plus ``Lk``. With groups, ``attn_dropout`` may give one rate per group (MulT's per-target
    attention dropout); :func:`subset_of_groups` narrows it when a subset of the groups runs.
    ``causal``: MulT's future mask (see :func:`future_allowed`).
    """

    def __init__(self, d: int, heads: int, attn_dropout: AttnDropout = 0.0, backend: str = "auto",
                 cross: bool = False, groups: int | None = None, causal: bool = False) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"width {d} is not divisible by {heads} heads")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(attn_dropout, (int, float)):
            attn_dropout = tuple(float(p) for p in attn_dropout)
            if len(attn_dropout) != (groups or 0):
                raise ValueError(f"{len(attn_dropout)} attention dropout rates for {groups} groups")
            if len(set(attn_dropout)) == 1:
                attn_dropout = attn_dropout[0]
        self.heads, self.attn_dropout, self.backend, self.cross = heads, attn_dropout, backend, cross
        self.causal = causal
        if cross:
            self.q = linear(d, d, groups)
            self.kv = linear(d, 2 * d, groups)
        else:
            self.qkv = linear(d, 3 * d, groups)
        self.out = linear(d, d, groups)

    def _heads(self, x: Tensor, n: int) -> Tensor:
        """(..., L, n·d) -> n tensors (N, H, L, hd) with N the product of the leading dims."""
        L = x.shape[-2]
        x = x.reshape(-1, L, n, self.heads, x.shape[-1] // (n * self.heads))
        return x.permute(2, 0, 3, 1, 4)  # (n, N, H, L, hd)

    def forward(self, x: Tensor, key_valid: Tensor | None, source: Tensor | None = None,
                query_index: Tensor | None = None, norms: Sequence[nn.Module] = (),
                future_offsets: Sequence[int] | None = None) -> Tensor:
        """Attend from ``x`` to ``x`` (self) or to ``source`` (cross).

        Returns the shape of ``x``; with ``query_index`` (the leading dims of ``x``, long) only
        that one step of ``x`` per row queries, and the result is (..., 1, d). ``norms``: the
        pre-norms of ``x`` (and of ``source``) when the inputs are not normalised yet; they are
        applied with the projections (:func:`norm_linear`). ``future_offsets``: with ``causal``
        and groups, the future-mask offset of each group (see :func:`attention`).
        """
        norm_x, norm_source = (*norms, None, None)[:2]
        if self.cross:
            (q,) = self._heads(norm_linear(norm_x, self.q, x), 1)
            k, v = self._heads(norm_linear(norm_source, self.kv, source), 2)
        else:
            q, k, v = self._heads(norm_linear(norm_x, self.qkv, x), 3)
        valid = None if key_valid is None else key_valid.reshape(-1, key_valid.shape[-1])
        causal = self.causal
        if query_index is not None:  # (N, H, L, hd) -> (N, H, 1, hd)
            index = query_index.reshape(-1, 1, 1, 1).expand(-1, q.shape[1], 1, q.shape[-1])
            q = q.gather(2, index)
            if causal:  # the future mask's row of that one query, as key validity: j <= index + offset
                offset = (abs(k.shape[-2] - x.shape[-2]) if future_offsets is None
                          else query_index.new_tensor(future_offsets).view(-1, *(1,) * (query_index.dim() - 1)))
                reach = (query_index + offset).reshape(-1, 1)
                allowed = torch.arange(k.shape[-2], device=k.device) <= reach
                valid, causal = (allowed if valid is None else valid & allowed), False
        p = self.attn_dropout if self.training else 0.0
        o = attention(q, k, v, valid, dropout_p=p, backend=self.backend, causal=causal, future_offsets=future_offsets,
                      groups=x.shape[0] if x.dim() == 4 else None)  # (N, H, Lq, hd)
        o = o.transpose(1, 2).reshape(*x.shape[:-2], q.shape[2], x.shape[-1])
        return self.out(o)


@contextmanager
def subset_of_groups(module: nn.Module, groups: Sequence[int]) -> Iterator[None]:
    """Within the block, every grouped attention in ``module`` uses the per-group dropout rates of
    ``groups`` only (for running a subset of the groups with their slice of the parameters)."""
    saved = {m: m.attn_dropout for m in module.modules()
             if isinstance(m, MultiHeadAttention) and not isinstance(m.attn_dropout, float)}
    try:
        for m, rates in saved.items():
            m.attn_dropout = tuple(rates[g] for g in groups)
        yield
    finally:
        for m, rates in saved.items():
            m.attn_dropout = rates
