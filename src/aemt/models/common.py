"""Small pieces shared by the models: modality names, masked convolution and pooling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aemt.models.layers import take_steps

if TYPE_CHECKING:
    from aemt.config import ModelConfig

MODALITIES: tuple[str, str, str] = ("text", "audio", "vision")


class MaskedConv1d(nn.Module):
    """Temporal ``Conv1d`` on (B, L, C_in) -> (B, L, C_out), 'same' padding (eq. 1 and eq. 4).

    Padded frames are zeroed before the convolution, so a kernel > 1 cannot carry values of
    padded frames into valid ones. A kernel of 1 runs as a linear layer (same parameters).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int, bias: bool = False) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"conv kernel must be odd and >= 1, got {kernel}")
        self.conv = nn.Conv1d(in_dim, out_dim, kernel, padding=kernel // 2, bias=bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x * mask.unsqueeze(-1).to(x.dtype)
        if self.conv.kernel_size[0] == 1:
            return F.linear(x, self.conv.weight.squeeze(-1), self.conv.bias)
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` (..., L, d) with the steps where ``mask`` (..., L) is False set to zero."""
    return x * mask.unsqueeze(-1).to(x.dtype)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (B, L, d) over the valid steps of ``mask`` (B, L) -> (B, d)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=-2) / m.sum(dim=-2).clamp_min(1.0)


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last valid step of ``mask`` (..., L) -> (...,) long (0 when none is valid)."""
    L = mask.shape[-1]
    return L - 1 - mask.flip(-1).to(torch.uint8).argmax(dim=-1)


def last_valid(x: Tensor, mask: Tensor) -> Tensor:
    """The last valid step of ``x`` (..., L, d) under ``mask`` (..., L) -> (..., d)."""
    return take_steps(x, last_valid_index(mask)).squeeze(-2)


def block_kwargs(cfg: ModelConfig, d: int | None = None,
                 attn_dropout: float | Sequence[float] | None = None) -> dict:
    """Keyword arguments of a Transformer block of width ``d`` (default ``cfg.d_model``);
    ``attn_dropout`` overrides ``cfg.attn_dropout`` (one rate, or one per group)."""
    return dict(d=d or cfg.d_model, heads=cfg.num_heads, dropout=cfg.dropout, ffn_dropout=cfg.rate("ffn"),
                attn_dropout=cfg.attn_dropout if attn_dropout is None else attn_dropout,
                backend=cfg.attention_backend)


def modality_kernels(cfg: ModelConfig) -> dict[str, int]:
    """``cfg.conv_kernels`` (text, audio, vision order) as a dict keyed by modality."""
    return {m: int(k) for m, k in zip(MODALITIES, cfg.conv_kernels)}


def check_dims(dims: dict[str, int]) -> dict[str, int]:
    """Validate that ``dims`` gives a positive feature width for every modality."""
    missing = [m for m in MODALITIES if m not in dims]
    if missing:
        raise ValueError(f"feature dims missing for {missing}; expected keys {MODALITIES}")
    return {m: int(dims[m]) for m in MODALITIES}
