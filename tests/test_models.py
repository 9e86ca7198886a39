"""Shapes, masking, equivalences and trainability of the models (tiny sizes, CPU, fast)."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from aemt.config import ModelConfig
from aemt.models import (AEMT, MODALITIES, PAIRS, CrossModalFusion, PretrainModel, build_autoencoder,
                         build_encoder, build_model, last_valid)
from aemt.models.layers import (CrossBlock, Dropout, EncoderBlock, GroupedLayerNorm, GroupedLinear, MultiHeadAttention,
                                TransformerStack, attention, dropout, embed_positions, norm_linear, resolve_backend,
                                subset_of_groups, take_steps)

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


# --- attention -----------------------------------------------------------------------------------

@pytest.mark.parametrize("head_dim", [5, 16])
def test_attention_backends_agree(head_dim):
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 2, 6, head_dim), torch.randn(4, 2, 9, head_dim), torch.randn(4, 2, 9, head_dim)
    valid = torch.arange(9)[None] < torch.tensor([9, 1, 4, 6])[:, None]
    out_math = attention(q, k, v, valid, backend="math")
    out_sdpa = attention(q, k, v, valid, backend="sdpa")
    assert out_math.shape == (4, 2, 6, head_dim)
    assert torch.allclose(out_math, out_sdpa, atol=1e-5)
    assert torch.allclose(attention(q, k, v, None, backend="math"), attention(q, k, v, None, backend="sdpa"), atol=1e-5)
    # a masked key has no influence
    k2, v2 = k.clone(), v.clone()
    k2[~valid[:, None, :, None].expand_as(k)] = 50.0
    v2[~valid[:, None, :, None].expand_as(v)] = -50.0
    assert torch.allclose(attention(q, k2, v2, valid, backend="math"), out_math, atol=1e-5)


def test_small_head_attention_backward_matches_autograd(monkeypatch):
    """The hand-written backward of the math kernel equals autograd on the plain formula (with a
    padding bias), and gradcheck holds with dropout rates per row run, cut into several chunks."""
    attention_module = sys.modules["aemt.models.layers.attention"]
    monkeypatch.setattr(attention_module, "_CHUNK_ELEMENTS", 2 * 4 * 7)  # 2 rows per chunk
    kernel = attention_module._SmallHeadAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, n, 5, generator=g, dtype=torch.float64, requires_grad=True) for n in (4, 7, 7))
    bias = torch.zeros(6, 1, 7, dtype=torch.float64)
    bias[:, :, 5:] = torch.finfo(torch.float64).min
    out = kernel.apply(q, k, v, bias, [(0, 6, 0.0)], 0.4)
    ref = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.4).softmax(-1) @ v
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(out, ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert torch.allclose(a, b)

    runs = [(0, 1, 0.0), (1, 6, 0.3)]  # row 0 without dropout, rows 1-5 in chunks of 2, 2 and 1

    def dropped_out(*qkv):
        torch.manual_seed(0)  # the same keep-masks at every call
        return kernel.apply(*qkv, bias, runs, 0.4)

    with torch.random.fork_rng():
        assert torch.allclose(dropped_out(q, k, v)[0], ref[0])
        assert not torch.allclose(dropped_out(q, k, v)[1:], ref[1:])
        assert torch.autograd.gradcheck(dropped_out, (q, k, v))
        # the draws off the CPU (a bool keep-mask), taken here on the CPU
        monkeypatch.setattr(attention_module, "dropout_bits",
                            lambda shape, p, device: (torch.rand(shape) >= p, 1.0 / (1.0 - p)))
        assert not torch.allclose(dropped_out(q, k, v)[1:], ref[1:])
        assert torch.autograd.gradcheck(dropped_out, (q, k, v))
    assert torch.autograd.gradcheck(lambda *x: kernel.apply(*x, None, [(0, 6, 0.0)], 0.4), (q, k, v))
    # MulT's future mask: alone (it is then the only bias, broadcast), and with the padding bias
    future = torch.zeros(4, 7, dtype=torch.float64).masked_fill_(torch.ones(4, 7).triu(4).bool(), -1e9)
    ref = (torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.4) + future).softmax(-1) @ v
    assert torch.allclose(kernel.apply(q, k, v, bias, [(0, 6, 0.0)], 0.4, future), ref)
    for key_bias in (None, bias):
        with torch.random.fork_rng():
            assert torch.autograd.gradcheck(lambda *x: (torch.manual_seed(0), kernel.apply(*x, key_bias, runs, 0.4,
                                                                                           future))[1], (q, k, v))


def test_causal_query_blocks_equal_the_full_computation():
    """Under the future mask the kernel computes rows that see only a prefix of the keys against
    that prefix (here two query blocks, Lq = 40, Lk = 44): the values equal the plain formula, with
    and without a padding bias, and gradcheck holds with dropout."""
    attention_module = sys.modules["aemt.models.layers.attention"]
    kernel = attention_module._SmallHeadAttention
    assert attention_module._query_blocks(40, 44, True) == [(0, 16, 20), (16, 40, 44)]
    assert attention_module._query_blocks(40, 44, False) == [(0, 40, 44)]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, 5, generator=g, dtype=torch.float64, requires_grad=True) for n in (40, 44, 44))
    future = attention_module._additive(attention_module.future_allowed(40, 44), torch.float64)
    bias = torch.zeros(3, 1, 44, dtype=torch.float64)
    bias[1, :, 10:] = torch.finfo(torch.float64).min
    for key_bias in (None, bias):
        scores = torch.baddbmm(torch.zeros(1, 1, 1, dtype=torch.float64) if key_bias is None else key_bias,
                               q, k.transpose(1, 2), alpha=0.4) + future
        assert torch.allclose(kernel.apply(q, k, v, key_bias, [(0, 3, 0.0)], 0.4, future), scores.softmax(-1) @ v)
    with torch.random.fork_rng():
        assert torch.autograd.gradcheck(
            lambda *x: (torch.manual_seed(0), kernel.apply(*x, bias, [(0, 1, 0.0), (1, 3, 0.3)], 0.4, future))[1],
            (q, k, v))


def test_dropout_backward():
    """The CPU dropout's backward rebuilds the forward's mask from its draws (gradcheck, non-contiguous input)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 20, generator=g, dtype=torch.float64).T.requires_grad_()  # non-contiguous
    with torch.random.fork_rng():
        assert torch.autograd.gradcheck(lambda t: (torch.manual_seed(1), dropout(t, 0.3))[1], (x,))
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x)) and dropout(x, 0.3).shape == x.shape


def test_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(200, 500, requires_grad=True)
    y = dropout(x, 0.1)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.01
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9), atol=1e-3)
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # the backward rebuilds the forward's mask from its draws
    assert dropout(x, 0.1, training=False) is x
    assert not torch.equal(dropout(x, 0.5), dropout(x, 0.5))  # fresh masks
    # attention-weight dropout keeps the expectation: mean over many draws ≈ no dropout
    q, k, v = torch.randn(1, 1, 4, 5), torch.randn(1, 1, 6, 5), torch.randn(1, 1, 6, 5)
    mean = torch.stack([attention(q, k, v, None, 0.3, "math") for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, attention(q, k, v, None, 0.0, "math"), atol=0.05)


def test_auto_backend_rule():
    assert resolve_backend("auto", torch.zeros(1, 1, 1, 5)) == "math"
    assert resolve_backend("auto", torch.zeros(1, 1, 1, 16)) == "sdpa"
    assert resolve_backend("math", torch.zeros(1, 1, 1, 64)) == "math"
    with pytest.raises(ValueError):
        resolve_backend("flash", torch.zeros(1, 1, 1, 5))


def test_grouped_attention_matches_plain():
    torch.manual_seed(0)
    grouped = MultiHeadAttention(16, 2, cross=True, groups=3).eval()
    x, src = torch.randn(3, B, 6, 16), torch.randn(3, B, 9, 16)
    valid = torch.rand(3, B, 9) > 0.3
    valid[..., 0] = True
    y = grouped(x, valid, source=src)
    for g in range(3):
        plain = MultiHeadAttention(16, 2, cross=True).eval()
        plain.load_state_dict({k: v[g] for k, v in grouped.state_dict().items()})
        assert torch.allclose(plain(x[g], valid[g], source=src[g]), y[g], atol=1e-5)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_per_group_attention_dropout(backend):
    """One rate per group: a group with rate 0 gets exactly the no-dropout result in training."""
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 2, 5, 4), torch.randn(6, 2, 7, 4), torch.randn(6, 2, 7, 4)  # 3 groups of 2
    valid = torch.rand(6, 7) > 0.3
    valid[:, 0] = True
    plain = attention(q, k, v, valid, 0.0, backend)
    out = attention(q, k, v, valid, (0.0, 0.6, 0.0), backend)
    assert torch.equal(out[:2], plain[:2]) and torch.equal(out[4:], plain[4:])
    assert not torch.allclose(out[2:4], plain[2:4])
    with pytest.raises(ValueError, match="do not divide"):
        attention(q, k, v, valid, (0.1, 0.2, 0.3, 0.4), backend)
    mha = MultiHeadAttention(8, 2, attn_dropout=(0.2, 0.2, 0.0), groups=3)
    with subset_of_groups(mha, [2, 0]):
        assert mha.attn_dropout == (0.0, 0.2)
    assert mha.attn_dropout == (0.2, 0.2, 0.0)
    assert MultiHeadAttention(8, 2, attn_dropout=(0.3, 0.3), groups=2).attn_dropout == 0.3


@pytest.mark.parametrize("bias", [True, False])
def test_norm_linear_folds_the_norms_affine(bias):
    """``norm_linear`` (LayerNorm affine folded into the projection) equals ``lin(norm(x))``, values and grads."""
    torch.manual_seed(0)
    norm, lin = GroupedLayerNorm(3, 8), GroupedLinear(3, 8, 5, bias=bias)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
    x = torch.randn(3, 2, 4, 8, requires_grad=True)
    params = [x, norm.weight, norm.bias, *lin.parameters()]
    folded, plain = norm_linear(norm, lin, x), lin(norm(x))
    assert torch.allclose(folded, plain, atol=1e-5)
    grad = torch.randn(plain.shape)
    for a, b in zip(torch.autograd.grad(folded, params, grad), torch.autograd.grad(plain, params, grad)):
        assert torch.allclose(a, b, atol=1e-4)


def test_grouped_linear_paths_agree():
    """CPU: one bmm when the groups split evenly over threads, else one matmul per group."""
    torch.manual_seed(0)
    layer, x = GroupedLinear(3, 8, 5), torch.randn(3, 2, 4, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # 3 % 1 == 0: bmm
        y_bmm = layer(x)
        torch.set_num_threads(2)  # 3 % 2 != 0: a loop of matmuls
        y_loop = layer(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(y_bmm, y_loop, atol=1e-6)
    assert torch.allclose(y_loop[1], x[1] @ layer.weight[1].T + layer.bias[1], atol=1e-6)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_causal_attention_is_mults_future_mask(backend):
    """causal=True: query i sees keys j <= i + |Lk - Lq| (MMSA's buffered_future_mask); both kernels agree."""
    torch.manual_seed(0)
    for Lq, Lk in ((6, 6), (4, 7)):
        q, k, v = torch.randn(3, 2, Lq, 5), torch.randn(3, 2, Lk, 5), torch.randn(3, 2, Lk, 5)
        valid = torch.arange(Lk)[None] < torch.tensor([[Lk], [Lk - 1], [2]])
        out = attention(q, k, v, valid, backend=backend, causal=True)
        allowed = torch.triu(torch.full((Lq, Lk), float("-inf")), 1 + abs(Lk - Lq)) == 0  # MMSA's construction
        scores = (q @ k.transpose(-1, -2)) / 5 ** 0.5
        scores = scores.masked_fill(~(allowed & valid[:, None, None, :]), float("-inf"))
        assert torch.allclose(out, scores.softmax(-1) @ v, atol=1e-5)
    x = torch.randn(2, 6, 8)
    mha = MultiHeadAttention(8, 2, causal=True).eval()
    changed = x.clone()
    changed[:, 4:] += 1.0  # the future of step 3
    assert torch.allclose(mha(x, None)[:, :4], mha(changed, None)[:, :4], atol=1e-6)
    assert not torch.allclose(mha(x, None)[:, 4:], mha(changed, None)[:, 4:])


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
    assert model.fusion.drop.p == 0.1 and model.encoders["text"].drop.p == 0.1 and model.head.drop.p == 0.3
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
    ae = build_autoencoder(kind, DIMS["text"], cfg, kernel=3).eval()
    h, x_hat = ae(feats["text"], masks["text"])
    assert h.shape == (B, 7, 16) and x_hat.shape == feats["text"].shape
    assert torch.all(h[~masks["text"]] == 0) and torch.all(x_hat[~masks["text"]] == 0)
    h2, x_hat2 = ae(perturb_padding(feats, masks)["text"], masks["text"])
    assert_valid_equal(h, h2, masks["text"])
    assert_valid_equal(x_hat, x_hat2, masks["text"])


def test_encoder_without_layers_is_mult_input_stage():
    cfg = tiny_cfg(encoder_layers=0, dropout=0.0)
    enc = build_encoder("transformer", 5, cfg, kernel=1)
    x = torch.randn(B, 4, 5)
    mask = torch.ones(B, 4, dtype=torch.bool)
    expected = embed_positions(x @ enc.conv.conv.weight.squeeze(-1).T)
    assert torch.allclose(enc(x, mask), expected, atol=1e-5)


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


# --- fusion ----------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("kind", ["transformer", "lstm"])
def test_load_pretrained_encoders(kind):
    cfg = tiny_cfg(autoencoder=kind)
    torch.manual_seed(0)
    pre = PretrainModel(DIMS, cfg)
    torch.manual_seed(1)
    model = AEMT(DIMS, cfg)
    loaded = model.load_pretrained_encoders(pre)
    assert len(loaded) == sum(len(model.encoders[m].state_dict()) for m in MODALITIES)
    for m in MODALITIES:
        ref = dict(pre.autoencoders[m].encoder.named_parameters())
        for name, p in model.encoders[m].named_parameters():
            assert torch.equal(p, ref[name]), (m, name)
    # a prefixed state dict (as a Lightning checkpoint stores it) loads too
    prefixed = {f"model.{k}": v for k, v in PretrainModel(DIMS, cfg).state_dict().items()}
    model.load_pretrained_encoders(prefixed)
    key = "model.autoencoders.audio.encoder.conv.conv.weight"
    assert torch.equal(model.encoders["audio"].conv.conv.weight, prefixed[key])
    with pytest.raises(KeyError):
        model.load_pretrained_encoders({})


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
        build_encoder("gru", 5, tiny_cfg(), 1)
    with pytest.raises(ValueError):
        build_model("mult", DIMS, tiny_cfg())
