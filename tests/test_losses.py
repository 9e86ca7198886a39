"""Losses against hand computations; tampering swaps exactly what its labels say."""

from __future__ import annotations

import math

import numpy as np
import torch

from aemt.data.tampering import tamper_batch
from aemt.training.losses import contrastive_groups, contrastive_loss, reconstruction_loss


def _cos(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def test_contrastive_loss_equals_hand_computed_eq18():
    z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.2], [0.0, 1.0]])
    z_sp = torch.tensor([[0.9, 0.1], [0.6, 0.8], [-0.7, 0.7], [0.1, 0.9]])
    # columns M, T, A, V. Clip 0 and 1: positive M, same T/A/V polarities -> weak positives of each other.
    # Clip 2: negative M -> negative of 0 and 1. Clip 3: neutral M -> no negatives -> left out.
    labels = torch.tensor([[0.6, 0.4, 0.2, 0.8], [0.4, 0.6, 0.6, 0.2], [-0.8, -0.2, 0.4, -0.6], [0.0, 0.4, 0.2, 0.8]])
    tau = 0.5
    weak, neg = contrastive_groups(labels, band=0.1)
    assert weak.tolist() == [[False, True, False, True], [True, False, False, True],
                             [False, False, False, False], [True, True, False, False]]
    assert neg.tolist() == [[False, False, True, False], [False, False, True, False],
                            [True, True, False, False], [False, False, False, False]]
    zn, spn = z.numpy(), z_sp.numpy()
    # clip 0: sp = s(z0, z0sp); weak = {1, 3}; neg = {2}
    l0 = -math.log((math.exp(_cos(zn[0], spn[0]) / tau) + math.exp(_cos(zn[0], zn[1]) / tau)
                    + math.exp(_cos(zn[0], zn[3]) / tau)) / math.exp(_cos(zn[0], zn[2]) / tau))
    l1 = -math.log((math.exp(_cos(zn[1], spn[1]) / tau) + math.exp(_cos(zn[1], zn[0]) / tau)
                    + math.exp(_cos(zn[1], zn[3]) / tau)) / math.exp(_cos(zn[1], zn[2]) / tau))
    l2 = -math.log(math.exp(_cos(zn[2], spn[2]) / tau)
                   / (math.exp(_cos(zn[2], zn[0]) / tau) + math.exp(_cos(zn[2], zn[1]) / tau)))
    total = contrastive_loss(z, z_sp, labels, tau=tau, band=0.1, reduction="sum")
    assert abs(total.item() - (l0 + l1 + l2)) < 1e-5
    mean = contrastive_loss(z, z_sp, labels, tau=tau, band=0.1)
    assert abs(mean.item() - (l0 + l1 + l2) / 3) < 1e-5


def test_contrastive_loss_without_negatives_is_zero_with_finite_grad():
    z = torch.randn(4, 3, requires_grad=True)
    labels = torch.full((4, 4), 0.5)
    loss = contrastive_loss(z, z.detach() + 0.1, labels, tau=0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def test_reconstruction_loss_ignores_padding():
    target = {"text": torch.zeros(2, 3, 2)}
    recon = {"text": torch.ones(2, 3, 2)}
    recon["text"][0, 2] = 100.0  # a padded frame: must not count
    masks = {"text": torch.tensor([[True, True, False], [True, True, True]])}
    assert reconstruction_loss(recon, target, masks).item() == 1.0


def test_tampering_swaps_one_modality_from_another_clip():
    b = 64
    feats = {m: torch.arange(b, dtype=torch.float32).view(b, 1, 1).expand(b, 5, 2).clone() + k * 1000
             for k, m in enumerate(("text", "audio", "vision"))}
    masks = {m: torch.arange(5)[None, :] < torch.randint(1, 6, (b, 1)) for m in feats}
    x, mk, y, modality, source = tamper_batch(feats, masks, p=0.5, generator=torch.Generator().manual_seed(0))
    assert 10 < y.sum() < 54  # about half tampered
    for i in range(b):
        for k, m in enumerate(("text", "audio", "vision")):
            swapped = bool(y[i]) and modality[i] == k
            src = int(source[i]) if swapped else i
            assert torch.equal(x[m][i], feats[m][src]) and torch.equal(mk[m][i], masks[m][src])
        assert (source[i] != i) == bool(y[i])  # a tampered clip takes another clip's modality
    assert torch.equal(y == 0, modality == -1)
    none = tamper_batch(feats, masks, p=0.0)[2]
    assert none.sum() == 0
