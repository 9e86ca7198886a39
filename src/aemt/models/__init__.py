"""Models: per-modality autoencoders (pre-training), MulT fusion and the AE-MT fine-tuning model.

Every model is built by name from a :class:`~aemt.config.ModelConfig` and the feature widths:
``build_model("pretrain" | "aemt", dims, cfg)``; the encoders and decoders of the three modalities,
of either kind, with :func:`build_encoders` / :func:`build_decoders`.
"""

from __future__ import annotations

from torch import nn

from aemt.config import ModelConfig
from aemt.models.aemt import AEMT, AEMTOutput, ProjectionHead
from aemt.models.autoencoder import (PretrainModel, PretrainOutput, TamperClassifier, TransformerDecoders,
                                     TransformerEncoders, build_decoders, build_encoders)
from aemt.models.common import MODALITIES, last_valid, masked_mean
from aemt.models.fusion import PAIRS, CrossModalFusion
from aemt.models.lstm_autoencoder import LSTMDecoder, LSTMDecoders, LSTMEncoder, LSTMEncoders

MODELS: dict[str, type[nn.Module]] = {"pretrain": PretrainModel, "aemt": AEMT}


def build_model(name: str, dims: dict[str, int], cfg: ModelConfig) -> nn.Module:
    """``"pretrain"`` → :class:`PretrainModel`, ``"aemt"`` → :class:`AEMT`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](dims, cfg)


__all__ = [
    "AEMT", "AEMTOutput", "CrossModalFusion", "LSTMDecoder", "LSTMDecoders", "LSTMEncoder", "LSTMEncoders",
    "MODALITIES", "MODELS", "PAIRS", "PretrainModel", "PretrainOutput", "ProjectionHead", "TamperClassifier",
    "TransformerDecoders", "TransformerEncoders", "build_decoders", "build_encoders", "build_model",
    "last_valid", "masked_mean",
]
