"""Dropout for the CPU that is cheap to draw and cheap to keep for the backward.

torch's CPU dropout draws one Bernoulli sample per element and took ~30 % of a MulT training
step. Here the masks come from 16-bit random integers (four per 64-bit word of numpy's PCG64,
seeded from torch's generator), and the backward keeps those 2-byte draws rather than a float
mask. Off the CPU everything falls back to torch's own dropout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _random_words(n: int) -> Tensor:
    """``n`` uniform random int64 words on the CPU.

    numpy's PCG64 makes them about twice as fast as ``Tensor.random_`` (mt19937); its seed is drawn
    from torch's generator, so ``torch.manual_seed`` still decides every mask.
    """
    seed = int(torch.randint(0, 2**62, (1,)))
    return torch.from_numpy(np.random.PCG64(seed).random_raw(n).view(np.int64))


def dropout_bits(shape: torch.Size, p: float, device: torch.device) -> tuple[Tensor, float]:
    """The random draws that decide a dropout keep-mask of ``shape`` at rate ``p``, and the matching
    scale 1 / P(keep); :func:`keep_from_bits` turns them into the mask.

    On the CPU the draws are 16-bit random integers (int16, four per 64-bit word): torch's CPU
    dropout draws one Bernoulli sample per element and took ~30 % of a MulT training step; this is
    ~5x cheaper, and at 2 bytes per element the draws are also the cheapest thing to keep for a
    backward. ``p`` is rounded to a multiple of 1/65536. Elsewhere the draws are a bool keep-mask.
    """
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p, 1.0 / (1.0 - p)
    n = math.prod(shape)
    threshold = _threshold16(p)
    return _random_words(max(1, (n + 3) // 4)).view(torch.int16)[:n].view(shape), 65536 / (65536 - threshold)


def _threshold16(p: float) -> int:
    return min(round(p * 65536), 65535)


def keep_from_bits(bits: Tensor, p: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """The 0/1 keep-mask of ``dtype`` that the draws ``bits`` of :func:`dropout_bits` at rate ``p``
    decide, always a new tensor (callers write into it)."""
    if bits.dtype == torch.bool:
        return bits.to(dtype)
    return torch.ge(bits, _threshold16(p) - 32768, out=torch.empty(bits.shape, dtype=dtype, device=bits.device))


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout (``F.dropout`` off the CPU, :func:`dropout_bits` masks on it)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or torch.compiler.is_compiling():  # compiled: traceable op
        return F.dropout(x, p, training=True)
    return _CpuDropout.apply(x, p)


class _CpuDropout(torch.autograd.Function):
    """``x ⊙ keep / P(keep)`` that keeps only the 16-bit draws for the backward (not a float mask)."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        bits, scale = dropout_bits(x.shape, p, x.device)
        ctx.save_for_backward(bits)
        ctx.p, ctx.scale = p, scale
        return keep_from_bits(bits, p, x.dtype).mul_(x).mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (bits,) = ctx.saved_tensors
        return keep_from_bits(bits, ctx.p, grad.dtype).mul_(grad).mul_(ctx.scale), None


class Dropout(nn.Dropout):
    """``nn.Dropout`` computed by :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
