"""Shapes, masking, equivalences and trainability of the models (tiny sizes, CPU, fast)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

import aemt
from aemt.config import ModelConfig
from aemt.models import AEMT, MODALITIES, PAIRS, PretrainModel, build_decoders, build_encoders, build_model
from aemt.models.autoencoder import MAX_QUERIES
from aemt.models.common import zero_padding
from aemt.models.layers import (CrossBlock, DecoderBlock, EncoderBlock, TransformerStack, embed_positions,
                                take_steps)

DIMS = {"text": 12, "audio": 5, "vision": 7}
B = 3


def tiny_cfg(**changes) -> ModelConfig:
    base = ModelConfig(d_model=16, num_heads=2, encoder_layers=2, decoder_layers=1, cross_layers=2,
                       self_layers=1, conv_kernels=(3, 1, 1), dropout=0.1, attn_dropout=0.1)
    return dataclasses.replace(base, **changes)


def make_batch(lengths=(7, 7, 7), valid=((7, 3, 1), (5, 7, 2), (7, 4, 6)), seed=0):
    """Features (B, L_m, D_m) and prefix masks (B, L_m) with the given valid lengths per modality."""
    g = torch.Generator().manual_seed(seed)
    feats, masks = {}, {}
    for m, L, n in zip(MODALITIES, lengths, valid):
        feats[m] = torch.randn(B, L, DIMS[m], generator=g)
        masks[m] = torch.arange(L)[None] < torch.tensor([min(v, L) for v in n])[:, None]
    return feats, masks


def perturb_padding(feats, masks, seed=1):
    """The same batch with large random values in every padded frame."""
    g = torch.Generator().manual_seed(seed)
    return {m: torch.where(masks[m][..., None], x, 100 * torch.randn(x.shape, generator=g))
            for m, x in feats.items()}


def assert_valid_equal(a, b, mask, atol=1e-5):
    assert torch.allclose(a[mask], b[mask], atol=atol), (a[mask] - b[mask]).abs().max()


def test_text_dropout_only_in_training():
    torch.manual_seed(0)
    model = AEMT(DIMS, tiny_cfg(text_dropout=0.5, dropout=0.0, attn_dropout=0.0, cross_attn_dropout=(0.0, 0.0, 0.0)))
    feats, masks = make_batch()
    assert model.text_drop.p == 0.5
    model.eval()
    assert torch.equal(model(feats, masks).prediction, model(feats, masks).prediction)
    model.train()
    assert not torch.allclose(model(feats, masks).prediction, model(feats, masks).prediction)


@pytest.mark.parametrize("causal", [False, True])
def test_stack_with_query_index_equals_full_stack_at_those_steps(causal):
    torch.manual_seed(0)
    stack = TransformerStack(lambda: EncoderBlock(16, 2, groups=3, causal=causal), 2, 16, groups=3).eval()
    x = torch.randn(3, B, 9, 16)
    valid = torch.arange(9)[None, None] < torch.randint(1, 10, (3, B, 1))
    index = torch.randint(0, 9, (3, B))
    full = stack(x, valid)
    assert torch.allclose(stack(x, valid, query_index=index), take_steps(full, index), atol=1e-5)
    empty = TransformerStack(lambda: EncoderBlock(16, 2), 0, 16, final_norm=False)
    assert torch.equal(empty(x[0], valid[0], query_index=index[0]), take_steps(x[0], index[0]))


def test_mult_dropout_options_reach_the_modules():
    cfg = tiny_cfg(dropout=0.2, ffn_dropout=0.0, embed_dropout=0.1, out_dropout=0.3,
                   cross_attn_dropout=(0.2, 0.1, 0.0), attn_dropout=0.25)
    model = AEMT(DIMS, cfg)
    block = model.fusion.cross.blocks[0]
    assert block.attn.attn_dropout == tuple({"text": 0.2, "audio": 0.1, "vision": 0.0}[j] for _, j in PAIRS)
    assert block.ffn.drop.p == 0.0 and block.drop.p == 0.2
    assert model.fusion.memory.blocks[0].attn.attn_dropout == 0.25
    assert model.fusion.drop.p == 0.1 and model.encoders.drop.p == 0.1 and model.head.drop.p == 0.3
    assert not model.fusion.cross.blocks[0].attn.causal
    causal = AEMT(DIMS, tiny_cfg(causal_attention=True))
    assert causal.fusion.cross.blocks[1].attn.causal and causal.fusion.memory.blocks[0].attn.causal


# --- autoencoders ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,decoder_input", [("transformer", "queries"), ("transformer", "memory"),
                                                ("lstm", "queries")])
def test_autoencoder_shapes_and_masking(kind, decoder_input):
    torch.manual_seed(0)
    cfg = tiny_cfg(decoder_input=decoder_input)
    feats, masks = make_batch()
    encoders, decoders = build_encoders(kind, DIMS, cfg).eval(), build_decoders(kind, DIMS, cfg).eval()
    h = encoders(feats, masks)
    x_hat = decoders(h, masks)
    h2 = encoders(perturb_padding(feats, masks), masks)
    x_hat2 = decoders(h2, masks)
    for m in MODALITIES:
        assert h[m].shape == (B, 7, 16) and x_hat[m].shape == feats[m].shape
        assert torch.all(h[m][~masks[m]] == 0) and torch.all(x_hat[m][~masks[m]] == 0)
        assert_valid_equal(h[m], h2[m], masks[m])
        assert_valid_equal(x_hat[m], x_hat2[m], masks[m])


def reference_autoencoders(encoders, decoders, cfg: ModelConfig, feats, masks):
    """Per-modality computation with ordinary (ungrouped) blocks holding each modality's weights."""
    def plain(stack, make_block, layers, g, final_norm=True):
        ref = TransformerStack(make_block, layers, cfg.d_model, final_norm=final_norm).eval()
        ref.load_state_dict({k: v[g] for k, v in stack.state_dict().items()})
        return ref

    kw = dict(d=cfg.d_model, heads=cfg.num_heads, backend=cfg.attention_backend)
    hidden, recon = {}, {}
    for g, m in enumerate(MODALITIES):
        encoder = plain(encoders.layers, lambda: EncoderBlock(**kw), cfg.encoder_layers, g)
        f = embed_positions(encoders.conv[m](feats[m], masks[m]))
        hidden[m] = zero_padding(encoder(f, masks[m]), masks[m])
        decoder = plain(decoders.layers, lambda: DecoderBlock(**kw), cfg.decoder_layers, g)
        L = feats[m].shape[1]
        inputs = hidden[m] if cfg.decoder_input == "memory" else decoders.queries[g, :L].expand(B, L, cfg.d_model)
        recon[m] = zero_padding(decoders.conv[m](decoder(inputs, masks[m], hidden[m], masks[m]), masks[m]), masks[m])
    return hidden, recon


@pytest.mark.parametrize("lengths,decoder_input", [((7, 7, 7), "queries"), ((7, 4, 9), "queries"),
                                                   ((7, 9, 7), "queries"), ((7, 9, 7), "memory")])
def test_grouped_autoencoders_equal_per_modality_reference(lengths, decoder_input):
    """The three modalities' stacks run as one grouped stack (equal lengths) or bucketed by length
    (single groups, or two groups and one); either way each modality gets exactly what its own
    Transformer with its weights computes."""
    torch.manual_seed(0)
    cfg = tiny_cfg(decoder_input=decoder_input)
    encoders, decoders = build_encoders("transformer", DIMS, cfg).eval(), build_decoders("transformer", DIMS, cfg).eval()
    if decoder_input == "queries":
        assert decoders.queries.shape == (len(MODALITIES), MAX_QUERIES, 16)
    feats, masks = make_batch(lengths=lengths)
    hidden = encoders(feats, masks)
    recon = decoders(hidden, masks)
    ref_hidden, ref_recon = reference_autoencoders(encoders, decoders, cfg, feats, masks)
    for m in MODALITIES:
        assert torch.allclose(hidden[m], ref_hidden[m], atol=1e-5), m
        assert torch.allclose(recon[m], ref_recon[m], atol=1e-5), m


def test_encoder_without_layers_is_mult_input_stage():
    cfg = tiny_cfg(encoder_layers=0, dropout=0.0, conv_kernels=(1, 1, 1))
    encoders = build_encoders("transformer", DIMS, cfg)
    feats = {m: torch.randn(B, 4, d) for m, d in DIMS.items()}
    masks = {m: torch.ones(B, 4, dtype=torch.bool) for m in DIMS}
    hidden = encoders(feats, masks)
    for m in MODALITIES:
        expected = embed_positions(feats[m] @ encoders.conv[m].conv.weight.squeeze(-1).T)
        assert torch.allclose(hidden[m], expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_pretrain_model_outputs_and_masking(kind):
    torch.manual_seed(0)
    model = PretrainModel(DIMS, tiny_cfg(autoencoder=kind)).eval()
    feats, masks = make_batch()
    out = model(feats, masks)
    assert out.tamper_logit.shape == (B,)
    for m in MODALITIES:
        assert out.hidden[m].shape == (B, 7, 16) and out.recon[m].shape == feats[m].shape
    out2 = model(perturb_padding(feats, masks), masks)
    assert torch.allclose(out.tamper_logit, out2.tamper_logit, atol=1e-5)
    for m in MODALITIES:
        assert_valid_equal(out.recon[m], out2.recon[m], masks[m])


# --- AE-MT -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_aemt_outputs_and_masking(kind):
    torch.manual_seed(0)
    model = build_model("aemt", DIMS, tiny_cfg(autoencoder=kind)).eval()
    feats, masks = make_batch()
    out = model(feats, masks)
    assert out.prediction.shape == (B,) and out.representation.shape == (B, 96)
    out2 = model(perturb_padding(feats, masks), masks)
    assert torch.allclose(out.prediction, out2.prediction, atol=1e-5)
    assert torch.allclose(out.representation, out2.representation, atol=1e-5)


def test_prediction_stays_float32_under_bf16_autocast():
    """The last Linear of the head runs outside autocast: ŷ is not rounded to bf16's 8 bits."""
    torch.manual_seed(0)
    model = build_model("aemt", DIMS, tiny_cfg()).eval()
    feats, masks = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(feats, masks)
        z = out.representation
        hidden = z + model.head.proj2(model.head.proj1(z).relu())
        rounded = model.head.out(hidden).squeeze(-1)  # what autocast alone gives
    assert out.prediction.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    exact = hidden.float() @ model.head.out.weight[0] + model.head.out.bias
    assert torch.allclose(out.prediction, exact, atol=1e-6)
    assert not torch.allclose(rounded.float(), exact, atol=1e-6)


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_load_pretrained_encoders(kind):
    cfg = tiny_cfg(autoencoder=kind)
    torch.manual_seed(0)
    pre = PretrainModel(DIMS, cfg)
    torch.manual_seed(1)
    model = AEMT(DIMS, cfg)
    loaded = model.load_pretrained_encoders(pre)
    assert sorted(loaded) == sorted(f"encoders.{k}" for k in model.encoders.state_dict())
    assert model.encoders.state_dict().keys() == pre.encoders.state_dict().keys()
    for name, p in model.encoders.state_dict().items():
        assert torch.equal(p, pre.encoders.state_dict()[name]), name
    # a prefixed state dict (as a Lightning checkpoint stores it) loads too, and the decoders stay out
    prefixed = {f"model.{k}": v for k, v in PretrainModel(DIMS, cfg).state_dict().items()}
    model.load_pretrained_encoders(prefixed)
    conv = "conv.audio.conv.weight" if kind == "transformer" else "audio.conv.conv.weight"
    assert torch.equal(model.encoders.state_dict()[conv], prefixed[f"model.encoders.{conv}"])
    with pytest.raises(KeyError):
        model.load_pretrained_encoders({})
    with pytest.raises(KeyError):
        model.load_pretrained_encoders({k: v for k, v in prefixed.items() if ".decoders." in k})


def test_different_lengths_and_cls_text():
    torch.manual_seed(0)
    model = AEMT(DIMS, tiny_cfg())
    feats, masks = make_batch(lengths=(1, 9, 6), valid=((1, 1, 1), (9, 3, 5), (2, 6, 6)))
    out = model(feats, masks)
    (out.prediction.sum() + out.representation.pow(2).mean()).backward()
    assert all(p.grad is not None for p in model.parameters())
    pre = PretrainModel(DIMS, tiny_cfg())
    res = pre(feats, masks)
    assert res.recon["text"].shape == (B, 1, DIMS["text"])
    (res.tamper_logit.sum() + sum(r.sum() for r in res.recon.values())).backward()


def _train(model, loss_fn, steps=25):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_aemt_learns_tiny_batch():
    torch.manual_seed(0)
    model = AEMT(DIMS, tiny_cfg(dropout=0.0, attn_dropout=0.0))
    feats, masks = make_batch()
    y = torch.tensor([0.5, -0.8, 0.1])
    losses = _train(model, lambda: (model(feats, masks).prediction - y).pow(2).mean())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_pretrain_reconstruction_improves(kind):
    torch.manual_seed(0)
    model = PretrainModel(DIMS, tiny_cfg(autoencoder=kind, dropout=0.0, attn_dropout=0.0))
    feats, masks = make_batch()

    def recon_loss():
        out = model(feats, masks)
        return sum((out.recon[m] - feats[m])[masks[m]].pow(2).mean() for m in MODALITIES)

    losses = _train(model, recon_loss)
    assert losses[-1] < 0.9 * losses[0]


def test_builders_reject_unknown_names():
    with pytest.raises(ValueError):
        build_encoders("gru", DIMS, tiny_cfg())
    with pytest.raises(ValueError):
        build_model("mult", DIMS, tiny_cfg())


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_residual_stream_stays_float32_under_bf16_autocast(stage):
    """Only the matmuls run in bf16: every block adds to a float32 residual stream."""
    torch.manual_seed(0)
    model = (build_model("aemt", DIMS, tiny_cfg()) if stage == "finetune" else PretrainModel(DIMS, tiny_cfg())).train()
    outputs = []
    for module in model.modules():
        if isinstance(module, (EncoderBlock, CrossBlock, DecoderBlock)):
            module.register_forward_hook(lambda mod, args, out: outputs.append((type(mod).__name__, out.dtype)))
    feats, masks = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(feats, masks)
    kinds = {"finetune": {"EncoderBlock", "CrossBlock"}, "pretrain": {"EncoderBlock", "DecoderBlock"}}[stage]
    assert {name for name, _ in outputs} == kinds
    assert {dtype for _, dtype in outputs} == {torch.float32}


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_models_ask_torch_nothing_about_autocast_while_they_run(stage, monkeypatch):
    """Inside the models the float32 residual stream is decided by dtypes alone: a query of
    autocast's state is a call that not every torch version can trace into a compiled graph.
    A model in bf16 throughout (``bf16-true``) keeps its stream in bf16."""
    torch.manual_seed(0)
    model = (build_model("aemt", DIMS, tiny_cfg()) if stage == "finetune" else PretrainModel(DIMS, tiny_cfg())).train()
    asked, package = [], str(Path(aemt.__file__).parent) + os.sep

    def spy(module, name):
        original = getattr(module, name)

        def called_from_aemt(*args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(package):  # not torch.autocast's own bookkeeping
                asked.append(f"{name} in {caller.co_name}")
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, called_from_aemt)

    for module, name in ((torch, "is_autocast_enabled"), (torch, "get_autocast_dtype"),
                         (torch.amp, "is_autocast_available")):
        spy(module, name)
    feats, masks = make_batch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # GroupedLinear's per-group CPU path (eager only) asks; not traced
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(feats, masks)
    finally:
        torch.set_num_threads(threads)
    assert asked == []
    model = model.to(torch.bfloat16)
    outputs = []
    for module in model.modules():
        if isinstance(module, (EncoderBlock, CrossBlock, DecoderBlock)):
            module.register_forward_hook(lambda mod, args, out: outputs.append(out.dtype))
    model({m: x.to(torch.bfloat16) for m, x in feats.items()}, masks)
    assert set(outputs) == {torch.bfloat16}


def test_an_unpadded_conv_shortens_the_sequence_and_its_mask():
    from aemt.models.common import MaskedConv1d

    conv = MaskedConv1d(DIMS["text"], 16, 5, padding="valid")
    feats, masks = make_batch(valid=((7, 6, 2), (7, 7, 7), (7, 7, 7)))
    out, mask = conv(feats["text"], masks["text"]), conv.output_mask(masks["text"])
    assert out.shape == (B, 3, 16) and mask.sum(-1).tolist() == [3, 2, 1]  # 7 - 4, 6 - 4, and one step for 2 < 5
    same = MaskedConv1d(DIMS["text"], 16, 5)
    assert same(feats["text"], masks["text"]).shape == (B, 7, 16) and torch.equal(same.output_mask(masks["text"]),
                                                                               masks["text"])


def test_mmsa_input_stage_ignores_padded_frames():
    """``conv_padding: valid`` (sequences shorter by k - 1, masks with them) and no positions: the
    prediction still depends on the valid frames only."""
    torch.manual_seed(0)
    model = AEMT(DIMS, tiny_cfg(encoder_layers=0, conv_padding="valid", position_embeddings=False,
                                causal_attention=True)).eval()
    feats, masks = make_batch()
    out = model(feats, masks).prediction
    assert torch.isfinite(out).all()
    assert torch.allclose(out, model(perturb_padding(feats, masks), masks).prediction, atol=1e-5)


def test_embed_positions_without_positions_only_scales():
    x = torch.randn(2, 5, 16)
    assert torch.equal(embed_positions(x, positions=False), 4.0 * x)
    assert not torch.allclose(embed_positions(x), 4.0 * x)


def test_pretraining_refuses_an_unpadded_conv():
    from aemt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'model.conv_padding': expected 'same' for pre-training"):
        PretrainModel(DIMS, tiny_cfg(conv_padding="valid"))
