"""AE-MT, the fine-tuning model (paper §3.3): pre-trained encoders E_m + MulT fusion + head."""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
from torch import Tensor, nn

from aemt.config import ModelConfig
from aemt.models.autoencoder import PretrainModel, build_encoders
from aemt.models.compat import split_at, upgrade_state_dict
from aemt.models.fusion import CrossModalFusion
from aemt.models.layers import Dropout


# device types with autocast, asked once here rather than inside the model: not every torch
# version can trace the query, and an untraceable call splits a compiled graph
_AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla",
                                        torch._C._get_privateuse1_backend_name())  # e.g. Ascend's "npu"
                              if torch.amp.is_autocast_available(d))


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
        if h.device.type not in _AUTOCAST_DEVICES:  # e.g. tracing on the meta device
            return self.out(h).squeeze(-1)
        with torch.autocast(h.device.type, enabled=False):  # ŷ in float32 under bf16 autocast (eq. 15)
            return self.out(h.to(self.out.weight.dtype)).squeeze(-1)  # float32 unless '*-true'


class AEMT(nn.Module):
    """Encoders E_m (eq. 1–2) → cross-modal fusion (eq. 11–14) → sentiment regression (eq. 15).

    The encoders are built exactly as in :class:`~aemt.models.autoencoder.PretrainModel`, so the
    pre-trained weights load with :meth:`load_pretrained_encoders`.
    """

    def __init__(self, dims: dict[str, int], cfg: ModelConfig) -> None:
        super().__init__()
        self.encoders = build_encoders(cfg.autoencoder, dims, cfg)
        self.fusion = CrossModalFusion(cfg)
        self.head = ProjectionHead(self.fusion.out_dim, cfg.rate("out"))
        self.text_drop = Dropout(cfg.text_dropout)  # MMSA's MulT: dropout on the text features

    def forward(self, features: dict[str, Tensor], masks: dict[str, Tensor]) -> AEMTOutput:
        features = {**features, "text": self.text_drop(features["text"])}
        hidden = self.encoders(features, masks)  # eq. 1–2
        masks = self.encoders.output_masks(masks)  # fewer steps without conv padding (MMSA's MulT)
        z = self.fusion(hidden, masks)  # eq. 11–14
        return AEMTOutput(self.head(z), z)

    def load_pretrained_encoders(self, pretrained: PretrainModel | Mapping[str, Tensor]) -> list[str]:
        """Copy the encoders E_m from a :class:`PretrainModel` or its state dict; returns the loaded keys.

        State-dict keys may carry a prefix (e.g. Lightning's ``model.``) before ``encoders.``.
        Raises ``KeyError`` when there are no encoder weights and ``RuntimeError`` when they do not
        fit (other shapes, another autoencoder kind).
        """
        state = pretrained.state_dict() if isinstance(pretrained, nn.Module) else pretrained
        state = upgrade_state_dict(state, [f"encoders.{k}" for k in self.encoders.state_dict()])  # older layouts
        encoder_state = {parts[1]: value for key, value in state.items() if (parts := split_at(key, "encoders."))}
        if not encoder_state:
            raise KeyError("no pre-trained encoder weights (keys 'encoders.*', optionally prefixed)")
        self.encoders.load_state_dict(encoder_state, strict=True)
        return [f"encoders.{name}" for name in encoder_state]
