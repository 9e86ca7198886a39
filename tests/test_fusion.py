"""MulT's cross-modal fusion: the grouped computation equals a per-pair reference, for equal
lengths, for lengths padded to one batch and for bucketed lengths (tiny sizes, CPU)."""

from __future__ import annotations

import sys

import pytest
import torch

from aemt.config import ModelConfig
from aemt.models import MODALITIES, PAIRS, CrossModalFusion, last_valid
from aemt.models.layers import CrossBlock, EncoderBlock, TransformerStack, embed_positions
from test_models import B, make_batch, tiny_cfg


def reference_fusion(fusion: CrossModalFusion, cfg: ModelConfig, hidden, masks):
    """Per-pair computation with ordinary (ungrouped) blocks holding each group's weights."""
    def plain(stack, make_block, layers, d, g):
        ref = TransformerStack(make_block, layers, d).eval()
        ref.load_state_dict({k: v[g] for k, v in stack.state_dict().items()})
        return ref

    kw = dict(heads=cfg.num_heads, backend=cfg.attention_backend, causal=cfg.causal_attention)
    z = [plain(fusion.cross, lambda: CrossBlock(cfg.d_model, **kw), cfg.cross_layers, cfg.d_model, g)(
        hidden[j], hidden[i], masks[i]) for g, (i, j) in enumerate(PAIRS)]
    last = []
    for k, m in enumerate(MODALITIES):
        z_m = torch.cat([z[2 * k], z[2 * k + 1]], dim=-1)
        mem = plain(fusion.memory, lambda: EncoderBlock(2 * cfg.d_model, **kw), cfg.self_layers, 2 * cfg.d_model, k)
        last.append(last_valid(mem(embed_positions(z_m), masks[m]), masks[m]))
    return torch.cat(last, dim=-1)


@pytest.mark.parametrize("backend,self_layers,causal", [("math", 1, False), ("sdpa", 1, False), ("math", 3, False),
                                                        ("math", 3, True), ("sdpa", 2, True)])
def test_grouped_fusion_equals_per_pair_reference(backend, self_layers, causal):
    torch.manual_seed(0)
    cfg = tiny_cfg(attention_backend=backend, self_layers=self_layers, causal_attention=causal)
    fusion = CrossModalFusion(cfg).eval()
    _, masks = make_batch()
    hidden = {m: torch.randn(B, 7, 16) for m in MODALITIES}
    z = fusion(hidden, masks)
    assert z.shape == (B, 6 * 16)
    assert torch.allclose(z, reference_fusion(fusion, cfg, hidden, masks), atol=1e-5)


def test_fusion_padding_and_bucketed_path_agree():
    """Trimming the padding of one modality (lengths differ → bucketed path) keeps Z unchanged."""
    torch.manual_seed(0)
    fusion = CrossModalFusion(tiny_cfg()).eval()
    valid = torch.tensor([5, 2, 4])
    masks = {m: torch.arange(9)[None] < valid[:, None] for m in MODALITIES}
    hidden = {m: torch.randn(B, 9, 16) for m in MODALITIES}
    z = fusion(hidden, masks)
    noisy = {m: torch.where(masks[m][..., None], h, 30 * torch.randn_like(h)) for m, h in hidden.items()}
    assert torch.allclose(fusion(noisy, masks), z, atol=1e-5)
    trimmed_h, trimmed_m = dict(hidden), dict(masks)
    trimmed_h["text"], trimmed_m["text"] = hidden["text"][:, :5], masks["text"][:, :5]
    assert torch.allclose(fusion(trimmed_h, trimmed_m), z, atol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_lengths_that_differ_a_little_are_padded_to_one_batch_with_the_same_function(backend, monkeypatch):
    """Text 6 steps, audio and vision 7 (as MMSA's unpadded text conv gives 46 beside 50): the six
    cross-modal stacks run as one padded batch, and Z and its gradients equal both the per-pair
    reference (true lengths, MulT's future mask with offset |L_i - L_j|) and the bucketed path."""
    torch.manual_seed(0)
    cfg = tiny_cfg(attention_backend=backend, causal_attention=True, self_layers=2)
    fusion = CrossModalFusion(cfg).eval()
    _, masks = make_batch()
    masks["text"] = masks["text"][:, :6]
    hidden = {m: torch.randn(B, 6 if m == "text" else 7, 16, requires_grad=True) for m in MODALITIES}
    calls = []
    fusion.cross.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))

    def z_and_grads():
        z = fusion(hidden, masks)
        return z, torch.autograd.grad(z.square().sum(), [hidden[m] for m in MODALITIES])

    z, grads = z_and_grads()
    assert calls == [(6, B, 7, 16)]  # one call, text padded
    assert torch.allclose(z, reference_fusion(fusion, cfg, hidden, masks), atol=1e-5)
    monkeypatch.setattr(sys.modules["aemt.models.fusion"], "PAD_TO_ONE_LENGTH_RATIO", 1.0)
    bucketed, bucketed_grads = z_and_grads()
    assert len(calls) == 4  # three buckets: text queries, text keys, the rest
    assert torch.allclose(z, bucketed, atol=1e-5)
    for a, b in zip(grads, bucketed_grads):
        assert torch.allclose(a, b, atol=1e-5)
