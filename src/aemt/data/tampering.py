"""Modality tampering for the consistency-detection task (paper eq. 6).

With probability ``p`` a clip gets one modality (chosen uniformly) replaced by the same modality
of another clip of the batch, valid length included; its label ``y_tamper`` is 1, else 0.
Vectorised over the batch: one gather per modality.
"""

from __future__ import annotations

import torch

from aemt.data.mmsa import MODALITIES


def tamper_batch(features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], p: float,
                 generator: torch.Generator | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return tampered ``(features, masks, y_tamper, modality, source)``.

    ``y_tamper`` (B,) float is 1 for tampered clips; ``modality`` (B,) is the index in
    ``MODALITIES`` of the swapped modality (-1 if none); ``source`` (B,) the clip it came from
    (itself if none). A batch of one clip cannot be tampered.
    """
    any_x = features[MODALITIES[0]]
    batch, device = any_x.shape[0], any_x.device
    if generator is None:  # draw on the batch's device: no host-to-device copy (and sync) per step
        rand = lambda *shape: torch.rand(*shape, device=device)  # noqa: E731
    else:  # a seeded CPU generator (validation): the same tampering every epoch
        rand = lambda *shape: torch.rand(*shape, generator=generator).to(device)  # noqa: E731
    tampered = (rand(batch) < p) & (batch > 1)
    modality = torch.where(tampered, (rand(batch) * len(MODALITIES)).long().clamp_max(len(MODALITIES) - 1),
                           torch.full((batch,), -1, device=device))
    offset = 1 + (rand(batch) * max(batch - 1, 1)).long().clamp_max(max(batch - 2, 0))  # in [1, B-1]
    own = torch.arange(batch, device=device)
    source = torch.where(tampered, (own + offset) % batch, own)
    out_x, out_m = {}, {}
    for i, m in enumerate(MODALITIES):
        rows = torch.where(modality == i, source, own)
        out_x[m] = features[m].index_select(0, rows)
        out_m[m] = masks[m].index_select(0, rows)
    return out_x, out_m, tampered.float(), modality, source
