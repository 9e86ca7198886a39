"""LSTM autoencoder: the paper's "w/o TR" ablation (Transformer encoder/decoder replaced by LSTMs).

One modality: ``LSTMEncoder(x, mask) -> H`` (B, L, d) and ``LSTMDecoder(H, mask) -> X̂`` (B, L, D_m).
``LSTMEncoders`` / ``LSTMDecoders`` hold one per modality, with the interfaces of the Transformer
kind in :mod:`aemt.models.autoencoder` (dicts keyed by modality in and out).

Masks are prefixes (valid frames first, padding after), as the data pipeline produces them. The
LSTMs are unidirectional, so a step only sees steps before it: padding at the end cannot leak
into valid outputs, and no packing (with its host sync for the lengths) is needed. The LSTM
decoder reads H_m step by step, so ``cfg.decoder_input`` does not apply to it.
"""

from __future__ import annotations

from torch import Tensor, nn

from aemt.config import ModelConfig
from aemt.models.common import MODALITIES, MaskedConv1d, modality_kernels, zero_padding
from aemt.models.layers import Dropout


def _lstm(d: int, layers: int, dropout: float) -> nn.Module | None:
    if layers == 0:
        return None
    return nn.LSTM(d, d, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)


class LSTMEncoder(nn.Module):
    """``Conv1d`` (eq. 1) → ``cfg.encoder_layers``-layer LSTM of width d → H_m (eq. 2)."""

    def __init__(self, in_dim: int, cfg: ModelConfig, kernel: int) -> None:
        super().__init__()
        self.conv = MaskedConv1d(in_dim, cfg.d_model, kernel, bias=False)
        self.drop = Dropout(cfg.rate("embed"))
        self.lstm = _lstm(cfg.d_model, cfg.encoder_layers, cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.drop(self.conv(x, mask))  # eq. 1: F_m
        if self.lstm is not None:
            h, _ = self.lstm(h)  # eq. 2: H_m
        return zero_padding(h, mask)


class LSTMDecoder(nn.Module):
    """``cfg.decoder_layers``-layer LSTM over H_m (eq. 3) → ``Conv1d`` to the feature width (eq. 4)."""

    def __init__(self, out_dim: int, cfg: ModelConfig, kernel: int) -> None:
        super().__init__()
        self.lstm = _lstm(cfg.d_model, cfg.decoder_layers, cfg.dropout)
        self.conv = MaskedConv1d(cfg.d_model, out_dim, kernel, bias=True)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        f = h if self.lstm is None else self.lstm(h)[0]  # eq. 3: F'_m
        return zero_padding(self.conv(f, mask), mask)  # eq. 4: X̂_m


class _PerModality(nn.ModuleDict):
    """One module per modality, applied as ``{m: module_m(x[m], masks[m])}``."""

    def forward(self, x: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self[m](x[m], masks[m]) for m in MODALITIES}


class LSTMEncoders(_PerModality):
    """An :class:`LSTMEncoder` per modality: ``forward(features, masks) -> {m: H_m}``."""

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        kernels = modality_kernels(cfg)
        super().__init__({m: LSTMEncoder(dims[m], cfg, kernels[m]) for m in MODALITIES})

    def output_masks(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """The valid steps of H_m: those of X_m (the convolutions are always padded)."""
        return masks


class LSTMDecoders(_PerModality):
    """An :class:`LSTMDecoder` per modality: ``forward(hidden, masks) -> {m: X̂_m}``."""

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        kernels = modality_kernels(cfg)
        super().__init__({m: LSTMDecoder(dims[m], cfg, kernels[m]) for m in MODALITIES})
