"""Per-modality Transformer autoencoders and the pre-training model (paper §3.2, eq. 1–9).

``ModalityEncoder`` is E_m (eq. 1–2), ``ModalityDecoder`` is D_m followed by the output
convolution (eq. 3–4), ``TamperClassifier`` is C_m (eq. 7–8), and ``PretrainModel`` holds one
autoencoder per modality plus the tamper classifier. The same encoder classes are reused by the
fine-tuning model (:mod:`aemt.models.aemt`), so their state dicts load one into the other.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from aemt.config import ModelConfig
from aemt.models.common import (MODALITIES, MaskedConv1d, block_kwargs, check_dims, masked_mean,
                                modality_kernels, zero_padding)
from aemt.models.layers import (DecoderBlock, Dropout, EncoderBlock, TransformerStack, embed_positions,
                                sinusoidal_positions)
from aemt.models.lstm_autoencoder import LSTMDecoder, LSTMEncoder

MAX_QUERIES = 1024  # longest sequence the learned decoder queries cover


class ModalityEncoder(nn.Module):
    """E_m: ``Conv1d`` to width d (eq. 1), ``sqrt(d)·F + positions``, Transformer encoder (eq. 2).

    With ``cfg.encoder_layers == 0`` this is exactly MulT's input stage (conv + scaled
    positions, no final LayerNorm). Output H_m is (B, L, d) with padded steps set to zero.
    """

    def __init__(self, in_dim: int, cfg: ModelConfig, kernel: int) -> None:
        super().__init__()
        self.conv = MaskedConv1d(in_dim, cfg.d_model, kernel, bias=False)
        self.drop = Dropout(cfg.rate("embed"))
        self.layers = TransformerStack(lambda: EncoderBlock(**block_kwargs(cfg)), cfg.encoder_layers,
                                       cfg.d_model, final_norm=cfg.encoder_layers > 0)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        f = self.conv(x, mask)  # eq. 1: F_m = Conv1D(X_m, k_m)
        h = self.layers(self.drop(embed_positions(f)), mask)  # eq. 2: H_m = E_m(F_m)
        return zero_padding(h, mask)


class ModalityDecoder(nn.Module):
    """D_m (eq. 3) and the output ``Conv1d`` (eq. 4): H_m (B, L, d) -> X̂_m (B, L, D_m).

    ``cfg.decoder_input == "queries"``: learned per-position queries (initialised to sinusoidal
    positions, up to :data:`MAX_QUERIES` steps) self-attend over the valid length and
    cross-attend to H_m, so everything about the clip must pass through H_m. ``"memory"``: the
    decoder input is H_m itself. The decoder never sees X_m.
    """

    def __init__(self, out_dim: int, cfg: ModelConfig, kernel: int) -> None:
        super().__init__()
        self.decoder_input = cfg.decoder_input
        if self.decoder_input == "queries":
            self.queries = nn.Parameter(sinusoidal_positions(MAX_QUERIES, cfg.d_model))
        self.layers = TransformerStack(lambda: DecoderBlock(**block_kwargs(cfg)), cfg.decoder_layers, cfg.d_model)
        self.conv = MaskedConv1d(cfg.d_model, out_dim, kernel, bias=True)

    def _inputs(self, h: Tensor) -> Tensor:
        if self.decoder_input == "memory":
            return h
        B, L, d = h.shape
        if L > MAX_QUERIES:
            raise ValueError(f"sequence length {L} exceeds the {MAX_QUERIES} learned decoder queries")
        return self.queries[:L].unsqueeze(0).expand(B, L, d)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        f = self.layers(self._inputs(h), mask, h, mask)  # eq. 3: F'_m = D_m(H_m)
        return zero_padding(self.conv(f, mask), mask)  # eq. 4: X̂_m = Conv1D(F'_m, k_m)


ENCODERS: dict[str, type[nn.Module]] = {"transformer": ModalityEncoder, "lstm": LSTMEncoder}
DECODERS: dict[str, type[nn.Module]] = {"transformer": ModalityDecoder, "lstm": LSTMDecoder}


def _lookup(table: dict[str, type[nn.Module]], kind: str) -> type[nn.Module]:
    if kind not in table:
        raise ValueError(f"unknown autoencoder kind {kind!r}; expected one of {sorted(table)}")
    return table[kind]


def build_encoder(kind: str, in_dim: int, cfg: ModelConfig, kernel: int) -> nn.Module:
    """An encoder E_m by kind (``"transformer"`` or ``"lstm"``)."""
    return _lookup(ENCODERS, kind)(in_dim, cfg, kernel)


def build_decoder(kind: str, out_dim: int, cfg: ModelConfig, kernel: int) -> nn.Module:
    """A decoder D_m with its output convolution by kind (``"transformer"`` or ``"lstm"``)."""
    return _lookup(DECODERS, kind)(out_dim, cfg, kernel)


class ModalityAutoencoder(nn.Module):
    """One modality's autoencoder: ``forward(x, mask) -> (H_m, X̂_m)``.

    ``kind`` (default ``cfg.autoencoder``) picks Transformer or LSTM encoder and decoder.
    """

    def __init__(self, in_dim: int, cfg: ModelConfig, kernel: int, kind: str | None = None) -> None:
        super().__init__()
        kind = kind or cfg.autoencoder
        self.encoder = build_encoder(kind, in_dim, cfg, kernel)
        self.decoder = build_decoder(kind, in_dim, cfg, kernel)

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x, mask)
        return h, self.decoder(h, mask)


def build_autoencoder(kind: str, in_dim: int, cfg: ModelConfig, kernel: int) -> ModalityAutoencoder:
    """A :class:`ModalityAutoencoder` of the given kind (``"transformer"`` or ``"lstm"``)."""
    return ModalityAutoencoder(in_dim, cfg, kernel, kind=kind)


class TamperClassifier(nn.Module):
    """C_m (eq. 7–8): masked mean of each H_m, concatenated, → MLP → tamper logit (B,).

    The sigmoid of eq. 8 is left to the BCE-with-logits loss (eq. 9).
    """

    def __init__(self, d: int, n_modalities: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_modalities * d, d), nn.ReLU(), Dropout(dropout), nn.Linear(d, 1))

    def forward(self, hidden: Sequence[Tensor], masks: Sequence[Tensor]) -> Tensor:
        f = torch.cat([masked_mean(h, m) for h, m in zip(hidden, masks)], dim=-1)  # eq. 7
        return self.mlp(f).squeeze(-1)  # eq. 8 (logit)


class PretrainOutput(NamedTuple):
    """Outputs of :class:`PretrainModel`: H_m and X̂_m per modality, and the tamper logit (B,)."""

    hidden: dict[str, Tensor]
    recon: dict[str, Tensor]
    tamper_logit: Tensor


class PretrainModel(nn.Module):
    """Stage 1 (§3.2): three autoencoders (``cfg.autoencoder`` kind) and the tamper classifier.

    ``forward(features, masks)`` takes dicts keyed by :data:`MODALITIES` of (B, L_m, D_m)
    features and (B, L_m) bool masks (True = valid frame).
    """

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__()
        dims, kernels = check_dims(dims), modality_kernels(cfg)
        self.autoencoders = nn.ModuleDict(
            {m: build_autoencoder(cfg.autoencoder, dims[m], cfg, kernels[m]) for m in MODALITIES})
        self.tamper = TamperClassifier(cfg.d_model, len(MODALITIES), cfg.rate("out"))

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor]) -> PretrainOutput:
        hidden, recon = {}, {}
        for m in MODALITIES:
            hidden[m], recon[m] = self.autoencoders[m](features[m], masks[m])  # eq. 2–4
        logit = self.tamper([hidden[m] for m in MODALITIES], [masks[m] for m in MODALITIES])  # eq. 7–8
        return PretrainOutput(hidden, recon, logit)
