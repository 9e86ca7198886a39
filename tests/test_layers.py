"""Attention kernels, dropout and grouped layers: equivalences, gradients and masking (tiny, CPU)."""

from __future__ import annotations

import sys

import pytest
import torch

from aemt.models.layers import (GroupedLayerNorm, GroupedLinear, MultiHeadAttention, attention, dropout, math_kernel,
                                norm_linear, resolve_backend, subset_of_groups)
from aemt.models.layers.math_kernel import Run


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


def test_sdpa_with_the_head_dim_padded_for_cuda_is_unchanged():
    """On CUDA, heads of 5 are zero-padded to 8 for the fused kernel: same values and gradients."""
    from aemt.models.layers.attention import _sdpa

    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, length, 5, requires_grad=True) for length in (6, 9, 9))
    mask = (torch.arange(9)[None] < torch.tensor([9, 1, 4])[:, None])[:, None, None, :]
    padded, plain = _sdpa(q, k, v, mask, 0.0, align=8), _sdpa(q, k, v, mask, 0.0)
    assert padded.shape == plain.shape == (3, 2, 6, 5)
    assert torch.allclose(padded, plain, atol=1e-6)
    grad = torch.randn(plain.shape)
    for a, b in zip(torch.autograd.grad(padded, (q, k, v), grad), torch.autograd.grad(plain, (q, k, v), grad)):
        assert torch.allclose(a, b, atol=1e-5)


def test_flop_counts_use_the_true_head_dims_where_sdpa_pads_them(monkeypatch):
    """Where SDPA pads heads of 5 to 8 (CUDA; here the CPU stands in for it), ``unpadded_heads``
    makes the FLOP counter see the model's own head dims, as :func:`aemt.evaluation.bench._flops` uses it."""
    from torch.utils.flop_counter import FlopCounterMode

    from aemt.evaluation.bench import _flops
    from aemt.models.layers.attention import unpadded_heads

    attention_module = sys.modules["aemt.models.layers.attention"]
    q, k, v = (torch.randn(4, 10, 50, 5) for _ in range(3))
    valid = torch.arange(50)[None] < torch.tensor([50, 20, 7, 1])[:, None]

    def count() -> float:
        with FlopCounterMode(display=False) as counter:
            attention(q, k, v, valid, backend="sdpa")
        return counter.get_total_flops()

    true_flops = count()
    monkeypatch.setattr(attention_module, "_PADDED_DEVICES", ("cpu",))
    padded_flops = count()
    assert padded_flops == true_flops * 8 / 5
    with unpadded_heads():
        assert count() == true_flops
    assert _flops(lambda: attention(q, k, v, valid, backend="sdpa")) == true_flops
    assert count() == padded_flops  # padded again after the block


def test_small_head_attention_backward_matches_autograd(monkeypatch):
    """The hand-written backward of the math kernel equals autograd on the plain formula (with a
    padding bias), and gradcheck holds with dropout rates per row run, cut into several chunks."""
    monkeypatch.setattr(math_kernel, "_CHUNK_ELEMENTS", 2 * 4 * 7)  # 2 rows per chunk
    kernel = math_kernel._SmallHeadAttention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, n, 5, generator=g, dtype=torch.float64, requires_grad=True) for n in (4, 7, 7))
    bias = torch.zeros(6, 1, 7, dtype=torch.float64)
    bias[:, :, 5:] = torch.finfo(torch.float64).min
    out = kernel.apply(q, k, v, bias, [Run(0, 6, 0.0, None)], 0.4)
    ref = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.4).softmax(-1) @ v
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    assert torch.allclose(out, ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert torch.allclose(a, b)

    runs = [Run(0, 1, 0.0, None), Run(1, 6, 0.3, None)]  # row 0 without dropout, rows 1-5 in chunks of 2, 2 and 1

    def dropped_out(*qkv):
        torch.manual_seed(0)  # the same keep-masks at every call
        return kernel.apply(*qkv, bias, runs, 0.4)

    with torch.random.fork_rng():
        assert torch.allclose(dropped_out(q, k, v)[0], ref[0])
        assert not torch.allclose(dropped_out(q, k, v)[1:], ref[1:])
        assert torch.autograd.gradcheck(dropped_out, (q, k, v))
        # the draws off the CPU (a bool keep-mask), taken here on the CPU
        monkeypatch.setattr(math_kernel, "dropout_bits",
                            lambda shape, p, device: (torch.rand(shape) >= p, 1.0 / (1.0 - p)))
        assert not torch.allclose(dropped_out(q, k, v)[1:], ref[1:])
        assert torch.autograd.gradcheck(dropped_out, (q, k, v))
    assert torch.autograd.gradcheck(lambda *x: kernel.apply(*x, None, [Run(0, 6, 0.0, None)], 0.4), (q, k, v))
    # MulT's future mask (offset 3 = |7 - 4|): alone (it is then the only bias, broadcast), and with the padding bias
    future = torch.zeros(4, 7, dtype=torch.float64).masked_fill_(torch.ones(4, 7).triu(4).bool(), -1e9)
    ref = (torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.4) + future).softmax(-1) @ v
    assert torch.allclose(kernel.apply(q, k, v, bias, [Run(0, 6, 0.0, 3)], 0.4), ref)
    causal_runs = [run._replace(offset=3) for run in runs]
    for key_bias in (None, bias):
        with torch.random.fork_rng():
            assert torch.autograd.gradcheck(lambda *x: (torch.manual_seed(0), kernel.apply(*x, key_bias, causal_runs,
                                                                                           0.4))[1], (q, k, v))


def test_causal_query_blocks_equal_the_full_computation():
    """Under the future mask the kernel computes rows that see only a prefix of the keys against
    that prefix (here two query blocks, Lq = 40, Lk = 44): the values equal the plain formula, with
    and without a padding bias, and gradcheck holds with dropout."""
    kernel = math_kernel._SmallHeadAttention
    assert math_kernel._query_blocks(40, 44, 4) == [(0, 16, 20), (16, 40, 44)]
    assert math_kernel._query_blocks(40, 44, None) == [(0, 40, 44)]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, 5, generator=g, dtype=torch.float64, requires_grad=True) for n in (40, 44, 44))
    future = math_kernel._additive(math_kernel.future_allowed(40, 44), torch.float64)
    bias = torch.zeros(3, 1, 44, dtype=torch.float64)
    bias[1, :, 10:] = torch.finfo(torch.float64).min
    for key_bias in (None, bias):
        scores = torch.baddbmm(torch.zeros(1, 1, 1, dtype=torch.float64) if key_bias is None else key_bias,
                               q, k.transpose(1, 2), alpha=0.4) + future
        assert torch.allclose(kernel.apply(q, k, v, key_bias, [Run(0, 3, 0.0, 4)], 0.4), scores.softmax(-1) @ v)
    with torch.random.fork_rng():
        assert torch.autograd.gradcheck(
            lambda *x: (torch.manual_seed(0), kernel.apply(*x, bias, [Run(0, 1, 0.0, 4), Run(1, 3, 0.3, 4)], 0.4))[1],
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
    x, src = torch.randn(3, 4, 6, 16), torch.randn(3, 4, 9, 16)
    valid = torch.rand(3, 4, 9) > 0.3
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


@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_paths_agree(bias):
    """CPU: one bmm when the groups split evenly over threads, else one matmul per group written
    into one output (with its own backward): same values and gradients as per-group ``F.linear``."""
    torch.manual_seed(0)
    layer = GroupedLinear(3, 8, 5, bias=bias)
    x = torch.randn(3, 4, 2, 8).transpose(1, 2).requires_grad_()  # not contiguous
    threads = torch.get_num_threads()
    grad = torch.randn(3, 2, 4, 5)
    results = []
    try:
        for n in (1, 2):  # 3 % 1 == 0: bmm; 3 % 2 != 0: a matmul per group
            torch.set_num_threads(n)
            y = layer(x)
            results.append((y, *torch.autograd.grad(y, [x, *layer.parameters()], grad)))
    finally:
        torch.set_num_threads(threads)
    reference = torch.stack([torch.nn.functional.linear(x[g], layer.weight[g], None if layer.bias is None
                                                        else layer.bias[g]) for g in range(3)])
    results.append((reference, *torch.autograd.grad(reference, [x, *layer.parameters()], grad)))
    for bmm, loop, plain in zip(*results):
        assert torch.allclose(loop, plain, atol=1e-5) and torch.allclose(bmm, plain, atol=1e-5)
    try:
        torch.set_num_threads(2)
        double = GroupedLinear(3, 4, 2, bias=bias).double()
        assert torch.autograd.gradcheck(lambda x_, w, *b: double(x_, w, b[0] if b else None),
                                        (torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True),
                                         *double.parameters()))
        with torch.no_grad():  # weights computed from others (the LayerNorm fold), without autograd
            assert torch.allclose(layer(x.detach(), layer.weight * 2), 2 * reference.detach()
                                  - (0 if layer.bias is None else layer.bias[:, None, None]), atol=1e-5)
    finally:
        torch.set_num_threads(threads)


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
        unmasked = ((q @ k.transpose(-1, -2)) / 5 ** 0.5).masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        assert torch.allclose(attention(q, k, v, None, backend=backend, causal=True), unmasked, atol=1e-5)
    x = torch.randn(2, 6, 8)
    mha = MultiHeadAttention(8, 2, causal=True).eval()
    changed = x.clone()
    changed[:, 4:] += 1.0  # the future of step 3
    assert torch.allclose(mha(x, None)[:, :4], mha(changed, None)[:, :4], atol=1e-6)
    assert not torch.allclose(mha(x, None)[:, 4:], mha(changed, None)[:, 4:])


def test_embed_positions_reuses_one_table_and_trains_after_inference():
    from aemt.models.layers import embed_positions, sinusoidal_positions
    from aemt.models.layers.transformer import _position_table

    with torch.inference_mode():  # the first use of this shape is a prediction
        embed_positions(torch.randn(2, 11, 6))
    assert _position_table(torch.zeros(11, 6)) is _position_table(torch.ones(3, 11, 6))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a traced (fake) table is not cached
        embed_positions(torch.empty(2, 13, 6))
    assert type(_position_table(torch.zeros(13, 6))) is torch.Tensor
    x = torch.randn(2, 11, 6, requires_grad=True)
    y = embed_positions(x)
    y.sum().backward()
    assert torch.allclose(y, 6 ** 0.5 * x + sinusoidal_positions(11, 6))
    assert torch.allclose(x.grad, torch.full_like(x, 6 ** 0.5))


def test_math_attention_on_bf16_inputs_rounds_only_its_output():
    """Scores, softmax and weighted sums in float32: the error is one bf16 rounding of the output."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 10, 50, 5, dtype=torch.bfloat16) * 2 for _ in range(3))
    valid = torch.arange(50)[None] < torch.randint(1, 51, (8, 1))
    exact = attention(q.float(), k.float(), v.float(), valid, backend="math", causal=True)
    out = attention(q, k, v, valid, backend="math", causal=True)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, exact.bfloat16())


def test_keys_padded_in_every_row_are_left_out_with_the_same_result():
    """A run that sees only its first keys (the rest padding in every row) computes, without the
    padding bias, what the full computation with the bias gives; the left-out keys get zero
    gradients. With one query block and with two (future mask)."""
    kernel = math_kernel._SmallHeadAttention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, n, 5, generator=g, dtype=torch.float64, requires_grad=True) for n in (40, 44, 44))
    bias = torch.zeros(4, 1, 44, dtype=torch.float64)
    bias[2:, :, 38:] = torch.finfo(torch.float64).min  # rows 2-3: the last 6 keys are padding
    grad = torch.randn(4, 40, 5, generator=g, dtype=torch.float64)
    for offset in (None, 4):
        full = kernel.apply(q, k, v, bias, [Run(0, 4, 0.0, offset)], 0.4)
        trimmed = kernel.apply(q, k, v, bias, [Run(0, 2, 0.0, offset, 44, False), Run(2, 4, 0.0, offset, 38, False)],
                               0.4)
        assert torch.allclose(trimmed, full)
        grads = torch.autograd.grad(trimmed, (q, k, v), grad)
        for a, b in zip(grads, torch.autograd.grad(full, (q, k, v), grad)):
            assert torch.allclose(a, b)
        assert torch.equal(grads[1][2:, 38:], torch.zeros(2, 6, 5, dtype=torch.float64))
    with torch.random.fork_rng():
        runs = [Run(0, 2, 0.3, 4, 44, False), Run(2, 4, 0.3, 4, 38, False)]
        assert torch.autograd.gradcheck(lambda *x: (torch.manual_seed(0), kernel.apply(*x, bias, runs, 0.4))[1], (q, k, v))


def test_row_runs_merge_equal_groups_and_read_each_groups_padding():
    row_runs = math_kernel.row_runs
    valid = torch.ones(6, 8, dtype=torch.bool)  # 3 groups of 2 rows
    valid[2:4, 6:] = False  # group 1: the last 2 keys padding in both rows
    valid[5, 3] = False  # group 2: a padded key inside one row
    assert row_runs(6, 0.1, None, 3, valid) == [Run(0, 2, 0.1, None, 8, False), Run(2, 4, 0.1, None, 6, False),
                                                Run(4, 6, 0.1, None, 8, True)]
    assert row_runs(6, (0.1, 0.1, 0.2), [3, 3, 3]) == [Run(0, 4, 0.1, 3), Run(4, 6, 0.2, 3)]
    assert row_runs(6, 0.0, [0, 2, 2]) == [Run(0, 2, 0.0, 0), Run(2, 6, 0.0, 2)]
    with pytest.raises(ValueError, match="2 per-group dropout rates and 3 per-group future offsets for a batch of 2"):
        row_runs(6, (0.1, 0.2), [0, 1, 2])
    with pytest.raises(ValueError, match="3 per-group future offsets for a batch of 2 groups"):
        row_runs(6, 0.1, [0, 1, 2], groups=2)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_future_offsets_per_group_keep_each_groups_true_lengths(backend):
    """Groups padded to a common length, each with the future-mask offset of its true lengths,
    give at their true steps what each group gives unpadded (MMSA's mask j <= i + |Lk - Lq|)."""
    torch.manual_seed(0)
    true = [(4, 7), (7, 5), (7, 7)]  # (Lq, Lk) of three groups of 2 rows, padded to (7, 7)
    q, k, v = torch.randn(6, 2, 7, 5), torch.randn(6, 2, 7, 5), torch.randn(6, 2, 7, 5)
    valid = torch.ones(6, 7, dtype=torch.bool)
    valid[2:4, 5:] = False  # group 1's keys are 5 long
    offsets = [abs(lk - lq) for lq, lk in true]
    out = attention(q, k, v, valid, backend=backend, causal=True, future_offsets=offsets, groups=3)
    for g, (lq, lk) in enumerate(true):
        rows = slice(2 * g, 2 * g + 2)
        alone = attention(q[rows, :, :lq], k[rows, :, :lk], v[rows, :, :lk], None, backend=backend, causal=True)
        assert torch.allclose(out[rows, :, :lq], alone, atol=1e-5)
    mha = MultiHeadAttention(8, 2, cross=True, groups=3, causal=True).eval()
    x, src = torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    index = torch.tensor([[3, 1], [6, 2], [5, 0]])
    full = mha(x, valid.view(3, 2, 7), source=src, future_offsets=offsets)
    at_index = mha(x, valid.view(3, 2, 7), source=src, query_index=index, future_offsets=offsets)
    assert torch.allclose(at_index.squeeze(-2), full.gather(2, index[..., None, None].expand(3, 2, 1, 8)).squeeze(-2),
                          atol=1e-5)
