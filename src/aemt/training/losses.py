"""The losses of AE-MT (paper eq. 5, 9, 10, 15, 17, 18, 19).

Choices the paper leaves open (also in the README):

* ``L_recon`` (eq. 5) is the MSE over *valid* frames of each modality, summed over the three
  autoencoders (one loss per autoencoder, as eq. 5 is written per modality m).
* Contrastive groups (eq. 18) are built from polarity classes: ``pol(x) = -1`` if
  ``x < -band``, ``+1`` if ``x > band``, else 0 (``band`` = ``finetune.neutral_band``).
  Weak positives of clip i are the other clips of the batch whose T, A and V polarity classes all
  equal clip i's, unless they are negatives; negatives are clips whose multimodal polarity is
  opposite (neutral clips have none). A clip with no negative in the batch has an empty denominator, so it is left out of
  the loss; with no such clip at all the loss is 0.
* Eq. 18 sums over clips; we divide by the number of contributing clips (``reduction="mean"``)
  so that λ2 does not depend on the batch size. ``reduction="sum"`` gives eq. 18 verbatim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def reconstruction_loss(recon: dict[str, Tensor], target: dict[str, Tensor], masks: dict[str, Tensor]) -> Tensor:
    """Eq. 5: per-modality MSE over valid frames, summed over modalities."""
    total = recon[next(iter(recon))].new_zeros(())
    for m, x_hat in recon.items():
        valid = masks[m].unsqueeze(-1).to(x_hat.dtype)
        squared = (x_hat.float() - target[m].float()).pow(2) * valid
        total = total + squared.sum() / (valid.sum() * x_hat.shape[-1]).clamp_min(1.0)
    return total


def consistency_loss(tamper_logit: Tensor, y_tamper: Tensor) -> Tensor:
    """Eq. 9: binary cross-entropy between the tamper probability and the label."""
    return F.binary_cross_entropy_with_logits(tamper_logit.float(), y_tamper.float())


def sentiment_loss(prediction: Tensor, label: Tensor) -> Tensor:
    """Eq. 15: mean squared error of the sentiment intensity."""
    return F.mse_loss(prediction.float(), label.float())


def polarity(x: Tensor, band: float) -> Tensor:
    """-1 / 0 / +1 polarity classes with a neutral band ``[-band, band]``."""
    return (x > band).long() - (x < -band).long()


def contrastive_groups(labels: Tensor, band: float) -> tuple[Tensor, Tensor]:
    """Weak-positive and negative masks (B, B) from labels (B, 4) with columns M, T, A, V."""
    pol = polarity(labels, band)
    same_unimodal = (pol[:, None, 1:] == pol[None, :, 1:]).all(dim=-1)
    eye = torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    m = pol[:, 0]
    negative = (m[:, None] * m[None, :]) < 0
    weak_pos = same_unimodal & ~eye & ~negative  # a clip is never both positive and negative
    return weak_pos, negative


def contrastive_loss(z: Tensor, z_strong: Tensor, labels: Tensor, tau: float, band: float = 0.1,
                     reduction: str = "mean") -> Tensor:
    """Eq. 18 with cosine similarity (eq. 17) and temperature ``tau``.

    ``z`` (B, F) are the representations of the clips, ``z_strong`` (B, F) those of their
    dropout-masked copies (eq. 16), ``labels`` (B, 4) the M, T, A, V labels.
    """
    zn = F.normalize(z.float(), dim=-1)
    sim = zn @ zn.T / tau  # s(Z_i, Z_j) / τ
    strong = (zn * F.normalize(z_strong.float(), dim=-1)).sum(-1) / tau  # s(Z_i, Z_i^sp) / τ
    weak_pos, negative = contrastive_groups(labels, band)
    neg_inf = torch.finfo(sim.dtype).min
    positives = torch.logsumexp(torch.cat([strong[:, None], sim.masked_fill(~weak_pos, neg_inf)], dim=1), dim=1)
    negatives = torch.logsumexp(sim.masked_fill(~negative, neg_inf), dim=1)
    has_negative = negative.any(dim=1)
    per_clip = torch.where(has_negative, negatives - positives, torch.zeros_like(negatives))  # -log(pos/neg)
    if reduction == "sum":
        return per_clip.sum()
    return per_clip.sum() / has_negative.sum().clamp_min(1)
