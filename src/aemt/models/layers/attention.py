"""Scaled dot-product attention behind one small function, and multi-head attention.

Two kernels compute the same thing (a test checks that they agree):

* ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels);
* ``"math"``: plain ``softmax(q @ kᵀ · scale + mask) @ v``.

``"auto"`` picks SDPA on CUDA or for head dims >= 16, the plain path otherwise: on the CPU the
fused kernel is slow for the tiny heads of MulT (head dim 5), see ``shared/perf-notes.md``.

Every layer here also works *grouped*: with ``groups=G`` the projections are
:class:`GroupedLinear` layers holding G independent weight sets, inputs carry a leading group
dim ``(G, B, L, d)``, and one attention call runs on ``(G·B, H, L, hd)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("auto", "sdpa", "math")
_SDPA_MIN_HEAD_DIM = 16


def resolve_backend(backend: str, q: Tensor) -> str:
    """The concrete kernel (``"sdpa"`` or ``"math"``) that ``backend`` means for ``q``."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "sdpa" if q.is_cuda or q.shape[-1] >= _SDPA_MIN_HEAD_DIM else "math"
    return backend


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """A bool dropout keep-mask with P(keep) ≈ 1 - p, and the matching scale 1 / P(keep).

    On the CPU the mask comes from 16-bit random integers, four per 64-bit draw: torch's CPU
    dropout draws one Bernoulli sample per element and took ~30 % of a MulT training step; this
    is ~5x cheaper. ``p`` is rounded to a multiple of 1/65536.
    """
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p, 1.0 / (1.0 - p)
    threshold = min(round(p * 65536), 65535)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # full 64-bit range
    uniform16 = words.view(torch.int16)[:n].view(shape)
    return uniform16 >= threshold - 32768, 65536 / (65536 - threshold)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout (``F.dropout`` off the CPU, a cheaper keep-mask on it; see :func:`keep_mask`)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return (x * keep).mul_(scale)


class Dropout(nn.Dropout):
    """``nn.Dropout`` computed by :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def _math_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, dropout_p: float) -> Tensor:
    """``softmax(q kᵀ / sqrt(hd) + mask) v`` with few passes over the (B·H, Lq, Lk) weights."""
    B, H, Lq, hd = q.shape
    Lk = k.shape[-2]
    q, k, v = q.reshape(B * H, Lq, hd), k.reshape(B * H, Lk, hd), v.reshape(B * H, Lk, hd)
    scale = 1.0 / math.sqrt(hd)
    if key_valid is None:
        scores = torch.bmm(q * scale, k.transpose(1, 2))
    else:  # one fused "bias + scale · q kᵀ"; the bias is finfo.min on padded keys
        bias = torch.zeros(B, 1, Lk, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill_(~key_valid[:, None, :], torch.finfo(q.dtype).min)
        scores = torch.baddbmm(bias.repeat_interleave(H, dim=0), q, k.transpose(1, 2), alpha=scale)
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:  # dropout's 1 / P(keep) is applied to the small output, not the weights
        keep, rescale = keep_mask(weights.shape, dropout_p, weights.device)
        return (torch.bmm(weights * keep, v) * rescale).view(B, H, Lq, hd)
    return torch.bmm(weights, v).view(B, H, Lq, hd)


def attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None,
              dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Multi-head scaled dot-product attention with a key padding mask.

    Args:
        q: queries (B, H, Lq, hd); k, v: keys and values (B, H, Lk, hd).
        key_valid: (B, Lk) bool, True where the key is a valid frame; None: all valid.
        dropout_p: dropout on the attention weights (pass 0 in eval mode).
        backend: ``"auto"``, ``"sdpa"`` or ``"math"``.
    Returns:
        (B, H, Lq, hd).
    """
    if resolve_backend(backend, q) == "sdpa":
        mask = None if key_valid is None else key_valid[:, None, None, :]  # (B, 1, 1, Lk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return _math_attention(q, k, v, key_valid, dropout_p)


class GroupedLinear(nn.Module):
    """G independent linear layers applied to a stacked input ``(G, ..., d_in)`` by one ``baddbmm``.

    ``weight`` is (G, d_out, d_in) and ``bias`` (G, d_out), so ``weight[g]``/``bias[g]`` are
    exactly the parameters of an ``nn.Linear(d_in, d_out)``.
    """

    def __init__(self, groups: int, d_in: int, d_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, d_out, d_in))
        self.bias = nn.Parameter(torch.empty(groups, d_out)) if bias else None
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init, per group
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        g, d_in = x.shape[0], x.shape[-1]
        flat = x.reshape(g, -1, d_in)
        w = self.weight.transpose(1, 2)  # (G, d_in, d_out)
        y = flat @ w if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), flat, w)
        return y.view(*x.shape[:-1], y.shape[-1])


class GroupedLayerNorm(nn.Module):
    """G independent LayerNorms over the last dim of ``(G, ..., d)``; ``weight``/``bias`` are (G, d)."""

    def __init__(self, groups: int, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(groups, d))
        self.bias = nn.Parameter(torch.zeros(groups, d))

    def forward(self, x: Tensor) -> Tensor:
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        y = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return torch.addcmul(self.bias.view(shape), y, self.weight.view(shape))


def linear(d_in: int, d_out: int, groups: int | None = None, bias: bool = True) -> nn.Module:
    """``nn.Linear`` or, with ``groups``, a :class:`GroupedLinear` of the same per-group shape."""
    return nn.Linear(d_in, d_out, bias=bias) if groups is None else GroupedLinear(groups, d_in, d_out, bias)


def layer_norm(d: int, groups: int | None = None) -> nn.Module:
    """``nn.LayerNorm`` or, with ``groups``, a :class:`GroupedLayerNorm`."""
    return nn.LayerNorm(d) if groups is None else GroupedLayerNorm(groups, d)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a fused projection: ``qkv`` (self) or ``q`` + ``kv`` (cross).

    Inputs are ``(..., L, d)``: ``(B, L, d)``, or ``(G, B, L, d)`` when ``groups=G``; all leading
    dims are folded into the attention batch. ``key_valid`` has the leading dims of the keys
    plus ``Lk``.
    """

    def __init__(self, d: int, heads: int, attn_dropout: float = 0.0, backend: str = "auto",
                 cross: bool = False, groups: int | None = None) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"width {d} is not divisible by {heads} heads")
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.heads, self.attn_dropout, self.backend, self.cross = heads, attn_dropout, backend, cross
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

    def forward(self, x: Tensor, key_valid: Tensor | None, source: Tensor | None = None) -> Tensor:
        """Attend from ``x`` to ``x`` (self) or to ``source`` (cross); returns the shape of ``x``."""
        if self.cross:
            (q,) = self._heads(self.q(x), 1)
            k, v = self._heads(self.kv(source), 2)
        else:
            q, k, v = self._heads(self.qkv(x), 3)
        valid = None if key_valid is None else key_valid.reshape(-1, key_valid.shape[-1])
        p = self.attn_dropout if self.training else 0.0
        o = attention(q, k, v, valid, dropout_p=p, backend=self.backend)  # (N, H, Lq, hd)
        o = o.transpose(1, 2).reshape(x.shape)
        return self.out(o)
