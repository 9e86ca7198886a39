"""The ``"math"`` attention kernel: ``softmax(q kᵀ · scale + mask)``, dropped out, applied to ``v``,
with a hand-written backward, for the CPU and MulT's small heads (see :class:`_SmallHeadAttention`).

The batch rows are split into :class:`Run` s that attend alike (one dropout rate, one offset of
MulT's future mask, the same keys seen), and the runs into chunks of bounded size.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from aemt.models.layers.dropout import dropout_bits, keep_from_bits

AttnDropout = Union[float, Sequence[float]]  # one rate, or one rate per group of the batch


class Run(NamedTuple):
    """Batch rows ``start..stop-1`` that attend alike."""

    start: int
    stop: int
    p: float  # dropout rate on the attention weights
    offset: int | None  # MulT's future mask: query i sees keys j <= i + offset; None: no future mask
    keys: int | None = None  # the rows see only the first `keys` keys (the rest is padding in all of them); None: all
    masked: bool = True  # some of those keys are padding: the rows need the padding bias


def row_runs(n: int, dropout_p: AttnDropout, offsets: int | Sequence[int] | None = None, groups: int | None = None,
             key_valid: Tensor | None = None) -> list[Run]:
    """The ``n`` batch rows as runs that attend alike: ``groups`` equal groups of consecutive rows
    (default: one, or as many as a per-group sequence has entries), adjacent groups merged where
    they are equal. ``dropout_p`` and ``offsets`` (future-mask offsets; None: no future mask) are
    one value for every row or one per group. ``key_valid`` (n, Lk), when given, is read on the
    host for each group's ``keys`` and ``masked`` (see :class:`Run`)."""
    counts = {name: len(x) for name, x in (("dropout rates", dropout_p), ("future offsets", offsets))
              if isinstance(x, (list, tuple))}
    groups = groups or next(iter(counts.values()), 1)
    if any(count != groups for count in counts.values()):
        given = " and ".join(f"{count} per-group {name}" for name, count in counts.items())
        raise ValueError(f"{given} for a batch of {groups} groups")
    if n % groups:
        raise ValueError(f"{groups} per-group dropout rates or offsets do not divide a batch of {n}")
    rates = dropout_p if isinstance(dropout_p, (list, tuple)) else [dropout_p] * groups
    offs = offsets if isinstance(offsets, (list, tuple)) else [offsets] * groups
    seen = _keys_seen(key_valid, groups) if key_valid is not None else [(None, True)] * groups
    size, runs = n // groups, []
    for g, (p, off, (keys, masked)) in enumerate(zip(rates, offs, seen)):
        run = Run(g * size, (g + 1) * size, float(p), off, keys, masked)
        if runs and runs[-1][2:] == run[2:]:
            runs[-1] = runs[-1]._replace(stop=run.stop)
        else:
            runs.append(run)
    return runs


def _keys_seen(key_valid: Tensor, groups: int) -> list[tuple[int, bool]]:
    """For each of ``groups`` equal groups of the rows of ``key_valid`` (n, Lk): how many leading keys
    its rows see (a tail of keys that is padding in every row of the group is left out: e.g. text
    padded to the length of the other modalities) and whether some of those are padding. One host
    read of the mask. (A row with no valid key, which prefix masks of length >= 1 never give,
    then averages its group's seen keys instead of all keys.)"""
    Lk = key_valid.shape[-1]
    valid = key_valid.reshape(groups, -1, Lk)
    keys = Lk - valid.any(1).flip(-1).to(torch.uint8).argmax(-1)  # (G,); Lk when no key is valid
    unseen = torch.arange(Lk, device=key_valid.device) >= keys[:, None]  # (G, Lk)
    masked = ~(valid | unseen[:, None, :]).flatten(1).all(-1)
    return [(k, bool(m)) for k, m in torch.stack([keys, masked.long()], -1).tolist()]


_CHUNK_ELEMENTS = 1 << 20  # attention weights per chunk: 4 MB in float32


def _chunks(runs: list[Run], rows: int) -> list[Run]:
    """The ``runs`` cut into chunks of at most ``rows`` rows."""
    return [run._replace(start=a, stop=min(a + rows, run.stop)) for run in runs for a in range(run.start, run.stop, rows)]


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
    rebuilding it from the draws). When a run's keys are valid the only bias is the (Lq, Lk) future
    mask (or none), broadcast inside the one ``baddbmm``. Under the future mask, query rows that
    see only a prefix of the keys are computed against that prefix (:func:`_query_blocks`); keys
    past a run's ``keys`` are left out (their gradients are zero).

    Inputs are (N, L, hd); ``bias`` (N, 1, Lk) or None; ``runs``: the :class:`Run` s of the N rows.
    Returns (N, Lq, hd).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, runs: list[Run], scale: float) -> Tensor:
        N, Lq, hd = q.shape
        Lk = k.shape[1]
        k_t, v_t = k.transpose(1, 2), v.transpose(1, 2)
        out_t = q.new_empty(N, hd, Lq)
        chunks = _chunks(runs, max(1, _CHUNK_ELEMENTS // max(1, Lq * Lk)))
        future_biases = {off: None if off is None else _additive(future_allowed(Lq, Lk, q.device, off), q.dtype)
                         for off in {run.offset for run in runs}}
        no_bias = q.new_zeros(1, 1, 1)
        saved: list[Tensor | None] = []
        rescales, chunk_blocks = [], []
        for a, b, p, off, seen, masked in chunks:
            rescale = 1.0
            future_bias, blocks = future_biases[off], _query_blocks(Lq, seen or Lk, off)
            for i0, i1, keys in blocks:  # query rows i0..i1-1 see only the first `keys` keys
                key_bias = bias[a:b, :, :keys] if bias is not None and masked else None
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
                    torch.bmm(v_t[a:b, :, :keys], applied, out=out_t[a:b])
                else:
                    out_t[a:b, :, i0:i1] = torch.bmm(v_t[a:b, :, :keys], applied)
                saved += [weights, dropped]
            if rescale != 1.0:  # out_t (c, hd, Lq) is small: rescale it, not the weights
                out_t[a:b].mul_(rescale)
            rescales.append(rescale)
            chunk_blocks.append(blocks)
        ctx.save_for_backward(q, k, v, *saved)
        ctx.chunks, ctx.chunk_blocks, ctx.rescales, ctx.scale = chunks, chunk_blocks, rescales, scale
        return out_t.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        q, k, v, *saved = ctx.saved_tensors
        N, Lq, hd = q.shape
        Lk = k.shape[1]
        grad_out_t = grad_out.transpose(1, 2)  # (N, hd, Lq)
        q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        grad_q_t, grad_k_t, grad_v_t = q.new_empty(N, hd, Lq), q.new_empty(N, hd, Lk), q.new_empty(N, hd, Lk)
        n = 0  # index of the (weights, dropped) pair of the current chunk and block in `saved`
        for (a, b, *_), rescale, blocks in zip(ctx.chunks, ctx.rescales, ctx.chunk_blocks):
            g_chunk = grad_out_t[a:b] if rescale == 1.0 else grad_out_t[a:b] * rescale  # (c, hd, Lq)
            seen = blocks[-1][2]
            if seen < Lk:  # keys no row of the chunk sees
                grad_k_t[a:b, :, seen:] = 0.0
                grad_v_t[a:b, :, seen:] = 0.0
            # the last block sees every key seen: it writes the key and value grads, the others add to them
            # (`out=` only into whole rows: into a strided view bmm loops over the batch)
            for j in reversed(range(len(blocks))):
                i0, i1, keys = blocks[j]
                weights, dropped = saved[n + 2 * j], saved[n + 2 * j + 1]
                applied = weights if dropped is None else dropped
                g_t = g_chunk[:, :, i0:i1]  # (c, hd, nq)
                if j == len(blocks) - 1 and keys == Lk:
                    torch.bmm(g_t, applied, out=grad_v_t[a:b])
                elif j == len(blocks) - 1:
                    grad_v_t[a:b, :, :keys] = torch.bmm(g_t, applied)
                else:
                    grad_v_t[a:b, :, :keys] += torch.bmm(g_t, applied)  # (baddbmm_ on a strided view loops)
                grad_d = torch.bmm(g_t.transpose(1, 2), v_t[a:b, :, :keys])  # (c, nq, keys): grad of the applied weights
                if dropped is None:
                    grad_s = torch._softmax_backward_data(grad_d, weights, -1, weights.dtype)
                else:  # W = softmax(S), D = W ⊙ keep: dS = D ⊙ dD − W · rowsum(D ⊙ dD), without the keep mask
                    grad_s = grad_d.mul_(dropped)
                    grad_s.addcmul_(weights, grad_s.sum(-1, keepdim=True), value=-1.0)
                if len(blocks) == 1:
                    torch.bmm(k_t[a:b, :, :keys], grad_s.transpose(1, 2), out=grad_q_t[a:b])
                else:
                    grad_q_t[a:b, :, i0:i1] = torch.bmm(k_t[a:b, :, :keys], grad_s.transpose(1, 2))
                if j == len(blocks) - 1 and keys == Lk:
                    torch.bmm(q_t[a:b, :, i0:i1], grad_s, out=grad_k_t[a:b])
                elif j == len(blocks) - 1:
                    grad_k_t[a:b, :, :keys] = torch.bmm(q_t[a:b, :, i0:i1], grad_s)
                else:
                    grad_k_t[a:b, :, :keys] += torch.bmm(q_t[a:b, :, i0:i1], grad_s)
            n += 2 * len(blocks)
        scale = ctx.scale
        return (grad_q_t.mul_(scale).transpose(1, 2), grad_k_t.mul_(scale).transpose(1, 2),
                grad_v_t.transpose(1, 2), None, None, None)


def _query_blocks(Lq: int, Lk: int, offset: int | None) -> list[tuple[int, int, int]]:
    """``(first, stop, keys)`` blocks of query rows: under MulT's future mask with ``offset`` (None:
    no mask) rows ``first..stop-1`` see only the first ``keys`` keys (``j <= i + offset``), so their
    scores are computed against those alone; the rest would be exact zeros after the softmax.

    Two blocks, split after a multiple of 16 query rows (for equal lengths the first block's rows
    are then a multiple of 16 keys long, and the CPU softmax is ~40 % cheaper per weight on rows of
    32 than of 25): at Lq = Lk = 50, rows 0–31 see 32 keys and rows 32–49 all 50, 23 % fewer
    weights. One block where that saves under 15 %. (A row whose visible keys are all padding, which
    prefix masks of length >= 1 never give, averages over its block's keys instead of all keys.)
    """
    full = [(0, Lq, Lk)]
    if offset is None:
        return full
    best, cost = full, Lq * Lk
    for stop in range(16, Lq, 16):
        keys = min(Lk, stop + offset)
        if stop * keys + (Lq - stop) * Lk < cost:
            best, cost = [(0, stop, keys), (stop, Lq, Lk)], stop * keys + (Lq - stop) * Lk
    return best if cost <= 0.85 * Lq * Lk else full


def future_allowed(Lq: int, Lk: int, device: torch.device | None = None, offset: int | None = None) -> Tensor:
    """MulT's future mask as a bool (Lq, Lk), True where query i may attend to key j:
    ``j <= i + offset``, by default ``offset = |Lk - Lq|`` (MMSA's ``buffered_future_mask``; for equal
    lengths, j <= i). Sequences padded to a common length keep the offset of their true lengths."""
    i = torch.arange(Lq, device=device)[:, None]
    j = torch.arange(Lk, device=device)[None, :]
    return j <= i + (abs(Lk - Lq) if offset is None else offset)


def _additive(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as an additive score bias: 0 where allowed, ``finfo.min`` elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def math_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, runs: list[Run]) -> Tensor:
    """``softmax(q kᵀ / sqrt(hd) + mask) v`` with dropout on the weights, by :class:`_SmallHeadAttention`,
    for q (B, H, Lq, hd), k and v (B, H, Lk, hd), ``key_valid`` (B, Lk) or None and the :func:`row_runs`
    of the B rows. bf16/fp16 inputs are computed in float32 (as autocast runs a softmax, and as SDPA's kernels
    accumulate) and only the output is rounded back."""
    if q.dtype in (torch.bfloat16, torch.float16):
        return math_attention(q.float(), k.float(), v.float(), key_valid, runs).to(q.dtype)
    B, H, Lq, hd = q.shape
    Lk = k.shape[-2]
    if key_valid is not None and not any(run.masked for run in runs):
        key_valid = None  # no bias to add
    bias = None if key_valid is None else _additive(key_valid[:, None, :], q.dtype).repeat_interleave(H, dim=0)
    head_runs = [run._replace(start=run.start * H, stop=run.stop * H) for run in runs]  # -> (batch, head) rows
    with torch.autocast(q.device.type, enabled=False):  # the kernel runs in q's dtype throughout
        out = _SmallHeadAttention.apply(q.reshape(B * H, Lq, hd), k.reshape(B * H, Lk, hd),
                                        v.reshape(B * H, Lk, hd), bias, head_runs, 1.0 / math.sqrt(hd))
    return out.view(B, H, Lq, hd)
