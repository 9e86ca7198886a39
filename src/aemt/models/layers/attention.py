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
from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aemt.models.layers.dropout import dropout_bits, keep_from_bits

BACKENDS = ("auto", "sdpa", "math")
_SDPA_MIN_HEAD_DIM = 16


def resolve_backend(backend: str, q: Tensor) -> str:
    """The concrete kernel (``"sdpa"`` or ``"math"``) that ``backend`` means for ``q``."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "sdpa" if q.is_cuda or q.shape[-1] >= _SDPA_MIN_HEAD_DIM else "math"
    return backend


AttnDropout = Union[float, Sequence[float]]  # one rate, or one rate per group of the batch


def _rate_runs(n: int, dropout_p: AttnDropout) -> list[tuple[int, int, float]]:
    """``(start, stop, p)`` runs of the ``n`` batch rows: one run for a single rate; for one rate
    per group (``n`` rows in ``len(dropout_p)`` equal groups), one run per stretch of equal rates."""
    if isinstance(dropout_p, (int, float)):
        return [(0, n, float(dropout_p))]
    if n % len(dropout_p):
        raise ValueError(f"{len(dropout_p)} per-group dropout rates do not divide a batch of {n}")
    size, runs = n // len(dropout_p), []
    for g, p in enumerate(dropout_p):
        if runs and runs[-1][2] == p:
            runs[-1] = (runs[-1][0], (g + 1) * size, p)
        else:
            runs.append((g * size, (g + 1) * size, float(p)))
    return runs


_CHUNK_ELEMENTS = 1 << 20  # attention weights per chunk: 4 MB in float32


def _chunks(runs: list[tuple[int, int, float]], rows: int) -> list[tuple[int, int, float]]:
    """The ``runs`` cut into ``(start, stop, p)`` chunks of at most ``rows`` rows."""
    return [(a, min(a + rows, stop), p) for start, stop, p in runs for a in range(start, stop, rows)]


class _SmallHeadAttention(torch.autograd.Function):
    """``softmax(scale · q kᵀ + bias)``, dropped out, applied to ``v``, in chunks, with a hand-written backward.

    Two things make the plain formula slow on the CPU for MulT's shapes, and this avoids both:

    * For head dims of 5–10, ``bmm`` is ~4x faster when the head dim is the *rows* of its output
      (``vᵀ wᵀ``, shape (N, hd, L)) than when it is the columns (``w v``); autograd's backward of the
      plain formula has three products of the slow shape, here every product has the fast one.
    * The (N, Lq, Lk) weights are the only large tensors. Made whole, rows whose dropout rate is 0
      (MulT's vision target) still got a mask of ones and a multiply, and at batch 64 each such
      tensor (38 MB) is above glibc's 32 MB mmap threshold, so every step mapped fresh pages and
      faulted them in. Here the rows run in chunks of one rate and at most ``_CHUNK_ELEMENTS`` weights
      (their memory is reused from step to step); rate-0 chunks skip the mask, and only the softmax
      output and the dropout's 16-bit draws are kept for the backward, which rebuilds the mask.

    Inputs are (N, L, hd); ``bias`` (N, 1, Lk) or None; ``runs``: ``(start, stop, p)`` row runs with
    their dropout rate (see :func:`_rate_runs`); ``future_bias`` (Lq, Lk) or None, added to every
    row's scores. Returns (N, Lq, hd).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, runs: list[tuple[int, int, float]],
                scale: float, future_bias: Tensor | None = None) -> Tensor:
        N, Lq, hd = q.shape
        Lk = k.shape[1]
        k_t, v_t = k.transpose(1, 2), v.transpose(1, 2)
        out_t = q.new_empty(N, hd, Lq)
        chunks = _chunks(runs, max(1, _CHUNK_ELEMENTS // max(1, Lq * Lk)))
        saved: list[Tensor | None] = []
        rescales = []
        for a, b, p in chunks:
            if bias is None:
                scores = torch.bmm(q[a:b], k_t[a:b]).mul_(scale)
            else:  # one fused "bias + scale · q kᵀ"
                scores = torch.baddbmm(bias[a:b], q[a:b], k_t[a:b], alpha=scale)
            if future_bias is not None:
                scores.add_(future_bias)
            weights = scores.softmax(dim=-1)
            bits, rescale = dropout_bits(weights.shape, p, q.device) if p > 0.0 else (None, 1.0)
            dropped = weights if bits is None else keep_from_bits(bits, p, q.dtype).mul_(weights)
            torch.bmm(v_t[a:b], dropped.transpose(1, 2), out=out_t[a:b])  # (c, hd, Lq)
            if rescale != 1.0:
                out_t[a:b].mul_(rescale)
            saved += [weights, bits]
            rescales.append(rescale)
        ctx.save_for_backward(q, k, v, *saved)
        ctx.chunks, ctx.rescales, ctx.scale = chunks, rescales, scale
        return out_t.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, *saved = ctx.saved_tensors
        N, Lq, hd = q.shape
        Lk = k.shape[1]
        grad_out_t = grad_out.transpose(1, 2)  # (N, hd, Lq)
        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        grad_q_t, grad_k_t, grad_v_t = q.new_empty(N, hd, Lq), q.new_empty(N, hd, Lk), q.new_empty(N, hd, Lk)
        for i, ((a, b, p), rescale) in enumerate(zip(ctx.chunks, ctx.rescales)):
            weights, bits = saved[2 * i], saved[2 * i + 1]
            keep = None if bits is None else keep_from_bits(bits, p, weights.dtype)
            g_t = grad_out_t[a:b] if rescale == 1.0 else grad_out_t[a:b] * rescale  # (c, hd, Lq)
            dropped = weights if keep is None else weights * keep
            torch.bmm(g_t, dropped, out=grad_v_t[a:b])
            grad_w = torch.bmm(g_t.transpose(1, 2), v_t[a:b])  # (c, Lq, Lk)
            if keep is not None:
                grad_w = grad_w.mul_(keep)
            grad_s = torch._softmax_backward_data(grad_w, weights, -1, weights.dtype)
            torch.bmm(k_t[a:b], grad_s.transpose(1, 2), out=grad_q_t[a:b])
            torch.bmm(q_t[a:b], grad_s, out=grad_k_t[a:b])
        scale = ctx.scale
        return (grad_q_t.mul_(scale).transpose(1, 2), grad_k_t.mul_(scale).transpose(1, 2),
                grad_v_t.transpose(1, 2), None, None, None, None)


def future_allowed(Lq: int, Lk: int, device: torch.device | None = None) -> Tensor:
    """MulT's future mask as a bool (Lq, Lk), True where query i may attend to key j:
    ``j <= i + |Lk - Lq|`` (MMSA's ``buffered_future_mask``; for equal lengths, j <= i)."""
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    return j <= i + abs(Lk - Lq)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as an additive score bias: 0 where allowed, ``finfo.min`` elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _math_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None,
                    runs: list[tuple[int, int, float]], causal: bool = False) -> Tensor:
    """``softmax(q kᵀ / sqrt(hd) + mask) v`` with dropout on the weights, by :class:`_SmallHeadAttention`."""
    B, H, Lq, hd = q.shape
    Lk = k.shape[-2]
    bias = None if key_valid is None else _additive(key_valid[:, None, :], q.dtype).repeat_interleave(H, dim=0)
    future = _additive(future_allowed(Lq, Lk, q.device), q.dtype) if causal else None
    row_runs = [(start * H, stop * H, p) for start, stop, p in runs]  # batch rows -> (batch, head) rows
    with torch.autocast(q.device.type, enabled=False):  # the kernel runs in q's dtype throughout
        out = _SmallHeadAttention.apply(q.reshape(B * H, Lq, hd), k.reshape(B * H, Lk, hd),
                                        v.reshape(B * H, Lk, hd), bias, row_runs, 1.0 / math.sqrt(hd), future)
    return out.view(B, H, Lq, hd)


def attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None,
              dropout_p: AttnDropout = 0.0, backend: str = "auto", causal: bool = False) -> Tensor:
    """Multi-head scaled dot-product attention with a key padding mask (and MulT's future mask).

    Args:
        q: queries (B, H, Lq, hd); k, v: keys and values (B, H, Lk, hd).
        key_valid: (B, Lk) bool, True where the key is a valid frame; None: all valid.
        dropout_p: dropout on the attention weights (pass 0 in eval mode); a sequence gives one
            rate per group of consecutive batch rows (B must be a multiple of its length).
        backend: ``"auto"``, ``"sdpa"`` or ``"math"``.
        causal: also mask the "future" keys, see :func:`future_allowed`.
    Returns:
        (B, H, Lq, hd).
    """
    runs = _rate_runs(q.shape[0], dropout_p)
    if resolve_backend(backend, q) == "math":
        return _math_attention(q, k, v, key_valid, runs, causal)
    mask = None if key_valid is None else key_valid[:, None, None, :]  # (B, 1, 1, Lk)
    if causal:
        allowed = future_allowed(q.shape[-2], k.shape[-2], q.device)
        mask = allowed if mask is None else mask & allowed
    out = [F.scaled_dot_product_attention(q[a:b], k[a:b], v[a:b], dropout_p=p,
                                          attn_mask=None if mask is None else mask[a:b]) for a, b, p in runs]
    return out[0] if len(out) == 1 else torch.cat(out)


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
        if x.device.type == "cpu" and g % torch.get_num_threads():
            # CPU bmm splits the groups over threads: 3 groups on 2 threads leave one idle half the
            # time. One multi-threaded matmul per group is ~25 % faster then.
            # unbind, not x[i]: the backward of x[i] fills a zero tensor of x's full size per group
            biases = [None] * g if self.bias is None else self.bias.unbind(0)
            return torch.stack([F.linear(x_g, w_g, b_g)
                                for x_g, w_g, b_g in zip(x.unbind(0), self.weight.unbind(0), biases)])
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
                query_index: Tensor | None = None) -> Tensor:
        """Attend from ``x`` to ``x`` (self) or to ``source`` (cross).

        Returns the shape of ``x``; with ``query_index`` (the leading dims of ``x``, long) only
        that one step of ``x`` per row queries, and the result is (..., 1, d).
        """
        if self.cross:
            (q,) = self._heads(self.q(x), 1)
            k, v = self._heads(self.kv(source), 2)
        else:
            q, k, v = self._heads(self.qkv(x), 3)
        valid = None if key_valid is None else key_valid.reshape(-1, key_valid.shape[-1])
        causal = self.causal
        if query_index is not None:  # (N, H, L, hd) -> (N, H, 1, hd)
            index = query_index.reshape(-1, 1, 1, 1).expand(-1, q.shape[1], 1, q.shape[-1])
            q = q.gather(2, index)
            if causal:  # the future mask's row of that one query, as key validity
                allowed = future_allowed(x.shape[-2], k.shape[-2], k.device)[query_index.reshape(-1)]
                valid, causal = (allowed if valid is None else valid & allowed), False
        p = self.attn_dropout if self.training else 0.0
        o = attention(q, k, v, valid, dropout_p=p, backend=self.backend, causal=causal)  # (N, H, Lq, hd)
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
