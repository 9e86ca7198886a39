"""AE-MT, the fine-tuning model (paper §3.3): pre-trained encoders E_m + MulT fusion + head."""

from __future__ import annotations

from typing import Mapping, NamedTuple

from torch import Tensor, nn

from aemt.config import ModelConfig
from aemt.models.autoencoder import PretrainModel, build_encoder
from aemt.models.common import MODALITIES, check_dims, modality_kernels
from aemt.models.fusion import CrossModalFusion
from aemt.models.layers import Dropout


class AEMTOutput(NamedTuple):
    """Sentiment prediction ŷ (B,) and the fused representation Z (B, 6d) used by eq. 18."""

    prediction: Tensor
    representation: Tensor


class ProjectionHead(nn.Module):
    """MulT's output head: ``Z + Linear(ReLU(Linear(Z)))`` with dropout, then ``Linear(6d, 1)``."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.proj1 = nn.Linear(dim, dim)
        self.proj2 = nn.Linear(dim, dim)
        self.drop = Dropout(dropout)
        self.out = nn.Linear(dim, 1)

    def forward(self, z: Tensor) -> Tensor:
        h = z + self.proj2(self.drop(self.proj1(z).relu()))
        return self.out(h).squeeze(-1)


class AEMT(nn.Module):
    """Encoders E_m (eq. 1–2) → cross-modal fusion (eq. 11–14) → sentiment regression (eq. 15).

    The encoders are built exactly as in :class:`~aemt.models.autoencoder.PretrainModel`, so the
    pre-trained weights load with :meth:`load_pretrained_encoders`.
    """

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__()
        dims, kernels = check_dims(dims), modality_kernels(cfg)
        self.encoders = nn.ModuleDict(
            {m: build_encoder(cfg.autoencoder, dims[m], cfg, kernels[m]) for m in MODALITIES})
        self.fusion = CrossModalFusion(cfg)
        self.head = ProjectionHead(self.fusion.out_dim, cfg.rate("out"))
        self.text_drop = Dropout(cfg.text_dropout)  # MMSA's MulT: dropout on the text features

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor]) -> AEMTOutput:
        features = {**features, "text": self.text_drop(features["text"])}
        hidden = {m: self.encoders[m](features[m], masks[m]) for m in MODALITIES}  # eq. 1–2
        z = self.fusion(hidden, masks)  # eq. 11–14
        return AEMTOutput(self.head(z), z)

    def load_pretrained_encoders(self, pretrained: PretrainModel | Mapping[str, Tensor]) -> list[str]:
        """Copy E_m from a :class:`PretrainModel` or its state dict; returns the loaded keys.

        State-dict keys may carry a prefix (e.g. Lightning's ``model.``) before
        ``autoencoders.<modality>.encoder.``. Raises ``KeyError``/``RuntimeError`` when an encoder
        is missing or its shapes differ.
        """
        state = pretrained.state_dict() if isinstance(pretrained, nn.Module) else pretrained
        loaded = []
        for m in MODALITIES:
            tag = f"autoencoders.{m}.encoder."
            sub = {k.split(tag, 1)[1]: v for k, v in state.items() if tag in k}
            if not sub:
                raise KeyError(f"no pre-trained encoder weights for modality '{m}' (keys '*{tag}*')")
            self.encoders[m].load_state_dict(sub, strict=True)
            loaded += [f"encoders.{m}.{k}" for k in sub]
        return loaded
