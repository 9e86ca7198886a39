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
from aemt.models.layers.grouped import linear, norm_linear

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
      (their memory is reused from step to step); rate-0 chunks skip the mask.

    The backward keeps the softmax output W and the dropped weights D = W ⊙ keep and computes
    ``dS = D ⊙ dD − W · rowsum(D ⊙ dD)``: no keep-mask is rebuilt or applied (~15 % faster than
    rebuilding it from the draws). When every key is valid the only bias is the (Lq, Lk) future
    mask (or none), broadcast inside the one ``baddbmm``. Under the future mask, query rows that
    see only a prefix of the keys are computed against that prefix (:func:`_query_blocks`).

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
        blocks = _query_blocks(Lq, Lk, future_bias is not None)
        no_bias = q.new_zeros(1, 1, 1)
        saved: list[Tensor | None] = []
        rescales = []
        for a, b, p in chunks:
            rescale = 1.0
            for i0, i1, keys in blocks:  # query rows i0..i1-1 see only the first `keys` keys
                key_bias = None if bias is None else bias[a:b, :, :keys]
                future = None if future_bias is None else future_bias[i0:i1, :keys]
                # one fused "bias + scale · q kᵀ"; the future bias broadcasts when it is the only bias
                scores = torch.baddbmm(key_bias if key_bias is not None else future if future is not None
                                       else no_bias, q[a:b, i0:i1], k_t[a:b, :, :keys], alpha=scale)
                if key_bias is not None and future is not None:
                    scores.add_(future)
                weights = scores.softmax(dim=-1)
                bits, rescale = dropout_bits(weights.shape, p, q.device) if p > 0.0 else (None, 1.0)
                dropped = None if bits is None else keep_from_bits(bits, p, q.dtype).mul_(weights)
                applied = (weights if dropped is None else dropped).transpose(1, 2)
                if len(blocks) == 1:
                    torch.bmm(v_t[a:b], applied, out=out_t[a:b])
                else:
                    out_t[a:b, :, i0:i1] = torch.bmm(v_t[a:b, :, :keys], applied)
                saved += [weights, dropped]
            if rescale != 1.0:  # out_t (c, hd, Lq) is small: rescale it, not the weights
                out_t[a:b].mul_(rescale)
            rescales.append(rescale)
        ctx.save_for_backward(q, k, v, *saved)
        ctx.chunks, ctx.blocks, ctx.rescales, ctx.scale = chunks, blocks, rescales, scale
        return out_t.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, *saved = ctx.saved_tensors
        N, Lq, hd = q.shape
        Lk = k.shape[1]
        blocks = ctx.blocks
        grad_out_t = grad_out.transpose(1, 2)  # (N, hd, Lq)
        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        grad_q_t, grad_k_t, grad_v_t = q.new_empty(N, hd, Lq), q.new_empty(N, hd, Lk), q.new_empty(N, hd, Lk)
        for i, ((a, b, p), rescale) in enumerate(zip(ctx.chunks, ctx.rescales)):
            g_chunk = grad_out_t[a:b] if rescale == 1.0 else grad_out_t[a:b] * rescale  # (c, hd, Lq)
            # the last block sees every key: it writes the key and value grads, the others add to them
            for j in reversed(range(len(blocks))):
                i0, i1, keys = blocks[j]
                n = 2 * (i * len(blocks) + j)  # (weights, dropped) of this chunk and block
                weights, dropped = saved[n], saved[n + 1]
                applied = weights if dropped is None else dropped
                g_t = g_chunk[:, :, i0:i1]  # (c, hd, nq)
                if j == len(blocks) - 1:
                    torch.bmm(g_t, applied, out=grad_v_t[a:b])
                else:
                    grad_v_t[a:b, :, :keys] += torch.bmm(g_t, applied)  # (baddbmm_ on a strided view loops)
                grad_d = torch.bmm(g_t.transpose(1, 2), v_t[a:b, :, :keys])  # (c, nq, keys): grad of the applied weights
                if dropped is None:
                    grad_s = torch._softmax_backward_data(grad_d, weights, -1, weights.dtype)
                else:  # W = softmax(S), D = W ⊙ keep: dS = D ⊙ dD − W · rowsum(D ⊙ dD), without the keep mask
                    grad_s = grad_d.mul_(dropped)
                    grad_s.addcmul_(weights, grad_s.sum(-1, keepdim=True), value=-1.0)
                if len(blocks) == 1:
                    torch.bmm(k_t[a:b], grad_s.transpose(1, 2), out=grad_q_t[a:b])
                else:
                    grad_q_t[a:b, :, i0:i1] = torch.bmm(k_t[a:b, :, :keys], grad_s.transpose(1, 2))
                if j == len(blocks) - 1:
                    torch.bmm(q_t[a:b, :, i0:i1], grad_s, out=grad_k_t[a:b])
                else:
                    grad_k_t[a:b, :, :keys] += torch.bmm(q_t[a:b, :, i0:i1], grad_s)
        scale = ctx.scale
        return (grad_q_t.mul_(scale).transpose(1, 2), grad_k_t.mul_(scale).transpose(1, 2),
                grad_v_t.transpose(1, 2), None, None, None, None)


def _query_blocks(Lq: int, Lk: int, causal: bool) -> list[tuple[int, int, int]]:
    """``(first, stop, keys)`` blocks of query rows: under MulT's future mask rows ``first..stop-1``
    see only the first ``keys`` keys (``j <= i + |Lk - Lq|``), so their scores are computed against
    those alone; the rest would be exact zeros after the softmax.

    Two blocks, split after a multiple of 16 query rows (for equal lengths the first block's rows
    are then a multiple of 16 keys long, and the CPU softmax is ~40 % cheaper per weight on rows of
    32 than of 25): at Lq = Lk = 50, rows 0–31 see 32 keys and rows 32–49 all 50, 23 % fewer
    weights. One block where that saves under 15 %. (A row whose visible keys are all padding, which
    prefix masks of length >= 1 never give, averages over its block's keys instead of all keys.)
    """
    off = abs(Lk - Lq)
    full = [(0, Lq, Lk)]
    if not causal:
        return full
    best, cost = full, Lq * Lk
    for stop in range(16, Lq, 16):
        keys = min(Lk, stop + off)
        if stop * keys + (Lq - stop) * Lk < cost:
            best, cost = [(0, stop, keys), (stop, Lq, Lk)], stop * keys + (Lq - stop) * Lk
    return best if cost <= 0.85 * Lq * Lk else full


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
    """``softmax(q kᵀ / sqrt(hd) + mask) v`` with dropout on the weights, by :class:`_SmallHeadAttention`;
    bf16/fp16 inputs are computed in float32 (as autocast runs a softmax, and as SDPA's kernels
    accumulate) and only the output is rounded back."""
    if q.dtype in (torch.bfloat16, torch.float16):
        return _math_attention(q.float(), k.float(), v.float(), key_valid, runs, causal).to(q.dtype)
    B, H, Lq, hd = q.shape
    Lk = k.shape[-2]
    if key_valid is not None and not q.is_cuda and bool(key_valid.all()):  # a host sync only off the GPU
        key_valid = None  # every key valid: no bias to add
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
        allowed = future_allowed(q.shape[-2], k.shape[-2], q.device)[None, None]  # (1, 1, Lq, Lk)
        mask = allowed if mask is None else mask & allowed
    align = _CUDA_HEAD_DIM_ALIGN if _pad_heads and q.device.type in _PADDED_DEVICES else 1
    out = [_sdpa(q[a:b], k[a:b], v[a:b], None if mask is None else mask[a:b] if mask.shape[0] > 1 else mask, p, align)
           for a, b, p in runs]
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
                query_index: Tensor | None = None, norms: Sequence[nn.Module] = ()) -> Tensor:
        """Attend from ``x`` to ``x`` (self) or to ``source`` (cross).

        Returns the shape of ``x``; with ``query_index`` (the leading dims of ``x``, long) only
        that one step of ``x`` per row queries, and the result is (..., 1, d). ``norms``: the
        pre-norms of ``x`` (and of ``source``) when the inputs are not normalised yet; they are
        applied with the projections (:func:`norm_linear`).
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
