"""The three modalities' Transformer autoencoders and the pre-training model (paper §3.2, eq. 1–9).

``TransformerEncoders`` are the E_m (eq. 1–2), ``TransformerDecoders`` the D_m with their output
convolutions (eq. 3–4), ``TamperClassifier`` is C_m (eq. 7–8), and ``PretrainModel`` holds the
encoders, the decoders and the tamper classifier. The fine-tuning model (:mod:`aemt.models.aemt`)
builds the same encoders, so their state dict loads from one into the other.

Speed: the three modalities' Transformer stacks are one *grouped* stack (leading dim 3, group g
is modality ``MODALITIES[g]``), run as one computation when the modalities have the same length
(the usual case after pooling), as the fusion's pair stacks are: a third of the operator calls
of three separate stacks, which on a GPU is what a step's time goes to at these widths. The
convolutions stay per modality (their feature widths differ).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from aemt.config import ModelConfig
from aemt.config_checks import MAX_QUERIES
from aemt.errors import ConfigError
from aemt.models.common import (MODALITIES, MaskedConv1d, block_kwargs, check_dims, masked_mean, modality_kernels,
                                run_grouped, zero_padding)
from aemt.models.layers import DecoderBlock, Dropout, EncoderBlock, TransformerStack, embed_positions, sinusoidal_positions
from aemt.models.lstm_autoencoder import LSTMDecoders, LSTMEncoders


class TransformerEncoders(nn.Module):
    """E_m of every modality: ``Conv1d`` to width d (eq. 1), ``sqrt(d)·F + positions``, Transformer
    encoder (eq. 2).

    ``forward(features, masks)`` -> H_m (B, L_m, d) per modality, padded steps set to zero. With
    ``cfg.encoder_layers == 0`` this is exactly MulT's input stage (conv + scaled positions, no
    final LayerNorm).
    """

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__()
        kernels, groups = modality_kernels(cfg), len(MODALITIES)
        self.conv = nn.ModuleDict({m: MaskedConv1d(dims[m], cfg.d_model, kernels[m], bias=False, padding=cfg.conv_padding)
                                   for m in MODALITIES})
        self.drop = Dropout(cfg.rate("embed"))
        self.positions = cfg.position_embeddings
        self.layers = TransformerStack(lambda: EncoderBlock(**block_kwargs(cfg), groups=groups), cfg.encoder_layers,
                                       cfg.d_model, groups=groups, final_norm=cfg.encoder_layers > 0)

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        f = [self.conv[m](features[m], masks[m]) for m in MODALITIES]  # eq. 1: F_m = Conv1D(X_m, k_m)
        masks = self.output_masks(masks)
        stream = self.conv[MODALITIES[0]].conv.weight.dtype  # float32 under autocast, see embed_positions
        inputs = [(self.drop(embed_positions(f_m, stream, self.positions)), masks[m]) for f_m, m in zip(f, MODALITIES)]
        h = run_grouped(self.layers, inputs) if self.layers.blocks else [x for x, _ in inputs]  # eq. 2: H_m = E_m(F_m)
        return {m: zero_padding(h_m, masks[m]) for h_m, m in zip(h, MODALITIES)}

    def output_masks(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """The valid steps of H_m for the valid frames ``masks`` of X_m (fewer steps without conv padding)."""
        return {m: self.conv[m].output_mask(masks[m]) for m in MODALITIES}


class TransformerDecoders(nn.Module):
    """D_m (eq. 3) and the output ``Conv1d`` (eq. 4) of every modality: H_m (B, L_m, d) -> X̂_m (B, L_m, D_m).

    ``cfg.decoder_input == "queries"``: learned per-position queries of each modality (initialised
    to sinusoidal positions, up to :data:`MAX_QUERIES` steps) self-attend over the valid length and
    cross-attend to H_m, so everything about the clip must pass through H_m. ``"memory"``: the
    decoder input is H_m itself. The decoder never sees X_m.
    """

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__()
        kernels, groups = modality_kernels(cfg), len(MODALITIES)
        self.decoder_input = cfg.decoder_input
        if self.decoder_input == "queries":
            self.queries = nn.Parameter(sinusoidal_positions(MAX_QUERIES, cfg.d_model).repeat(groups, 1, 1))
        self.layers = TransformerStack(lambda: DecoderBlock(**block_kwargs(cfg), groups=groups), cfg.decoder_layers,
                                       cfg.d_model, groups=groups)
        self.conv = nn.ModuleDict({m: MaskedConv1d(cfg.d_model, dims[m], kernels[m], bias=True) for m in MODALITIES})

    def _inputs(self, g: int, h: Tensor) -> Tensor:
        if self.decoder_input == "memory":
            return h
        B, L, d = h.shape
        if L > MAX_QUERIES:
            raise ValueError(f"sequence length {L} exceeds the {MAX_QUERIES} learned decoder queries")
        return self.queries[g, :L].expand(B, L, d)

    def forward(self, hidden: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
        args = [(self._inputs(g, hidden[m]), masks[m], hidden[m], masks[m]) for g, m in enumerate(MODALITIES)]
        f = run_grouped(self.layers, args)  # eq. 3: F'_m = D_m(H_m)
        return {m: zero_padding(self.conv[m](f_m, masks[m]), masks[m]) for f_m, m in zip(f, MODALITIES)}  # eq. 4


ENCODERS: dict[str, type[nn.Module]] = {"transformer": TransformerEncoders, "lstm": LSTMEncoders}
DECODERS: dict[str, type[nn.Module]] = {"transformer": TransformerDecoders, "lstm": LSTMDecoders}


def _lookup(table: dict[str, type[nn.Module]], kind: str) -> type[nn.Module]:
    if kind not in table:
        raise ValueError(f"unknown autoencoder kind {kind!r}; expected one of {sorted(table)}")
    return table[kind]


def build_encoders(kind: str, dims: dict[str, int], cfg: ModelConfig) -> nn.Module:
    """The encoders E_m of every modality, by kind (``"transformer"`` or ``"lstm"``):
    ``forward(features, masks) -> {modality: H_m}``."""
    return _lookup(ENCODERS, kind)(check_dims(dims), cfg)


def build_decoders(kind: str, dims: dict[str, int], cfg: ModelConfig) -> nn.Module:
    """The decoders D_m with their output convolutions, by kind (``"transformer"`` or ``"lstm"``):
    ``forward(hidden, masks) -> {modality: X̂_m}``."""
    return _lookup(DECODERS, kind)(check_dims(dims), cfg)


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
    """Stage 1 (§3.2): the autoencoders of the three modalities (``cfg.autoencoder`` kind) and the
    tamper classifier.

    ``forward(features, masks)`` takes dicts keyed by :data:`MODALITIES` of (B, L_m, D_m)
    features and (B, L_m) bool masks (True = valid frame).
    """

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.conv_padding != "same":
            raise ConfigError(f"config key 'model.conv_padding': expected 'same' for pre-training (the autoencoders "
                              f"reconstruct every frame), got {cfg.conv_padding!r}")
        self.encoders = build_encoders(cfg.autoencoder, dims, cfg)
        self.decoders = build_decoders(cfg.autoencoder, dims, cfg)
        self.tamper = TamperClassifier(cfg.d_model, len(MODALITIES), cfg.rate("out"))

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor]) -> PretrainOutput:
        hidden = self.encoders(features, masks)  # eq. 1–2
        recon = self.decoders(hidden, masks)  # eq. 3–4
        logit = self.tamper([hidden[m] for m in MODALITIES], [masks[m] for m in MODALITIES])  # eq. 7–8
        return PretrainOutput(hidden, recon, logit)
