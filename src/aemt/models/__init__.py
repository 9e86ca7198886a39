"""Models: per-modality autoencoders (pre-training), MulT fusion and the AE-MT fine-tuning model.

Every model is built by name from a :class:`~aemt.config.ModelConfig` and the feature widths:
``build_model("pretrain" | "aemt", dims, cfg)``; encoders/autoencoders of either kind with
:func:`build_encoder` / :func:`build_autoencoder`.
"""

from __future__ import annotations

from torch import nn

from aemt.config import ModelConfig
from aemt.models.aemt import AEMT, AEMTOutput, ProjectionHead
from aemt.models.autoencoder import (ModalityAutoencoder, ModalityDecoder, ModalityEncoder, PretrainModel,
                                     PretrainOutput, TamperClassifier, build_autoencoder, build_decoder,
                                     build_encoder)
from aemt.models.common import MODALITIES, last_valid, masked_mean
from aemt.models.fusion import PAIRS, CrossModalFusion
from aemt.models.lstm_autoencoder import LSTMDecoder, LSTMEncoder

MODELS: dict[str, type[nn.Module]] = {"pretrain": PretrainModel, "aemt": AEMT}


def build_model(name: str, dims: dict[str, int], cfg: ModelConfig) -> nn.Module:
    """``"pretrain"`` → :class:`PretrainModel`, ``"aemt"`` → :class:`AEMT`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name](dims, cfg)


__all__ = [
    "AEMT", "AEMTOutput", "CrossModalFusion", "LSTMDecoder", "LSTMEncoder", "MODALITIES", "MODELS", "PAIRS",
    "ModalityAutoencoder", "ModalityDecoder", "ModalityEncoder", "PretrainModel", "PretrainOutput",
    "ProjectionHead", "TamperClassifier", "build_autoencoder", "build_decoder", "build_encoder", "build_model",
    "last_valid", "masked_mean",
]
