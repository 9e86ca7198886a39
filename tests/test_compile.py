"""``torch.compile`` of the models (``aemt.training.common.compile_model``), traced on the CPU with
the ``aot_eager`` backend: no graph breaks, one graph for every batch size, blocks compiled apart."""

from __future__ import annotations

import functools
import pickle

import pytest
import torch
from test_models import DIMS, make_batch, tiny_cfg
from torch._dynamo.utils import counters

from aemt.models import AEMT, MODALITIES, PretrainModel
from aemt.training import common


def _aot_eager(monkeypatch, **options) -> None:
    """``torch.compile`` (as ``compile_model`` calls it) with the ``aot_eager`` backend, caches reset."""
    compile_ = torch.compile
    monkeypatch.setattr(common.torch, "compile",
                        lambda fn, mode=None, **kw: compile_(fn, backend="aot_eager", **options, **kw))
    torch._dynamo.reset()
    counters.clear()


def _train_steps(forward, batches=(11, 9, 13), loss=lambda out: out.prediction.sum(), steps: int = 7) -> list[int]:
    """One training step per batch size through ``forward`` (clips of ``steps`` frames); the number
    of compiled graphs after each. (The sizes equal no other dim: equal sizes would share one symbol.)"""
    graphs = []
    for batch in batches:
        feats = {m: torch.randn(batch, steps, DIMS[m]) for m in MODALITIES}
        masks = {m: torch.arange(steps)[None] < torch.randint(1, steps + 1, (batch, 1)) for m in MODALITIES}
        loss(forward(feats, masks)).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_model_is_one_graph_for_every_batch_size(monkeypatch, autocast):
    """``torch.compile`` sees the model as one graph (no graph breaks), also under bf16 autocast
    as GPU runs train, and trains through it; ``compile_model`` marks the batch dim dynamic and
    nothing in the model specialises on it, so batches of 11, 9 and 13 clips (an epoch's last
    batch, validation) reuse that one graph. In eval mode it matches eager (while compiling,
    attention runs as SDPA and dropout as F.dropout)."""
    _aot_eager(monkeypatch, fullgraph=True)
    torch.manual_seed(0)
    model = AEMT(dict(DIMS), tiny_cfg(causal_attention=True, text_dropout=0.1))
    forward = common.compile_model(model, "default")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert _train_steps(forward) == [1, 1, 1]
    assert all(p.grad is not None for p in model.fusion.parameters())
    assert pickle.loads(pickle.dumps(forward))  # a Lightning module holding it pickles (ddp_spawn)
    model.eval()
    feats, masks = make_batch()
    with torch.no_grad():
        assert torch.allclose(forward(feats, masks).prediction, model(feats, masks).prediction, atol=1e-5)


def test_mmsa_input_stage_with_its_text_padded_in_the_fusion_is_one_graph(monkeypatch):
    """MMSA's input stage (unpadded text conv: 15 text steps beside 17, padded to 17 in the fusion
    with per-pair future-mask offsets) compiles to one graph for every batch size and matches eager."""
    _aot_eager(monkeypatch, fullgraph=True)
    torch.manual_seed(0)
    model = AEMT(dict(DIMS), tiny_cfg(causal_attention=True, encoder_layers=0, conv_padding="valid",
                                      position_embeddings=False))
    forward = common.compile_model(model, "default")
    assert _train_steps(forward, steps=17) == [1, 1, 1]
    model.eval()
    feats = {m: torch.randn(5, 17, DIMS[m]) for m in MODALITIES}
    masks = {m: torch.arange(17)[None] < torch.tensor([[17], [9], [3], [17], [12]]) for m in MODALITIES}
    with torch.no_grad():
        assert torch.allclose(forward(feats, masks).prediction, model(feats, masks).prediction, atol=1e-5)


def test_cudagraphs_backend_traces_one_graph_per_batch_size_and_matches_eager_on_the_cpu():
    """``compile_backend="cudagraphs"`` (no code generation): one traced graph, forward and
    backward, per batch size (replaying one recording for a smaller batch failed on an H200), a
    repeated size compiles nothing new, and dynamo may keep more graphs than its default 8; on
    the CPU the backend records nothing and runs the traced graph, which matches eager in eval
    mode under ``no_grad``."""
    torch._dynamo.reset()
    counters.clear()
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    torch.manual_seed(0)
    model = AEMT(dict(DIMS), tiny_cfg(causal_attention=True))
    with torch._dynamo.config.patch(**{limit: 8}):
        forward = common.compile_model(model, "default", backend="cudagraphs")
        assert getattr(torch._dynamo.config, limit) == common._RECOMPILE_LIMIT
    assert _train_steps(forward, batches=(11, 9, 11, 13)) == [1, 2, 2, 3]
    assert all(p.grad is not None for p in model.fusion.parameters())
    assert counters["inductor"]["cudagraph_skips"] >= 1  # CPU tensors: nothing recorded
    assert pickle.loads(pickle.dumps(forward))
    model.eval()
    feats, masks = make_batch()
    with torch.no_grad():
        assert torch.allclose(forward(feats, masks).prediction, model(feats, masks).prediction, atol=1e-5)
    for mode, scope, backend in (("default", "blocks", "cudagraphs"), ("reduce-overhead", "model", "cudagraphs"),
                                 ("default", "model", "tvm")):
        with pytest.raises(ValueError, match=f"compile backend '{backend}' with mode '{mode}' and scope '{scope}'"):
            common.compile_model(model, mode, scope, backend)


def test_cudagraphs_backend_keeps_the_batch_static_after_a_graph_break(monkeypatch):
    """Where dynamo breaks the model into pieces (as it did on a GPU with torch 2.11), the pieces
    after the break get their own graph per batch size too: a piece made dynamic would replay one
    CUDA-graph recording for another batch size, which fails."""
    from aemt.models import fusion

    original = fusion.last_valid_index

    def with_graph_break(mask):
        torch._dynamo.graph_break()
        return original(mask)

    monkeypatch.setattr(fusion, "last_valid_index", with_graph_break)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    forward = common.compile_model(AEMT(dict(DIMS), tiny_cfg()), "default", backend="cudagraphs")
    graphs = _train_steps(forward, batches=(11, 9, 11, 13))
    assert graphs[0] > 1  # pieces: one graph each
    assert graphs == [graphs[0], 2 * graphs[0], 2 * graphs[0], 3 * graphs[0]]


def test_graphs_hold_nothing_that_stops_cuda_graph_recording():
    """What a GPU run would record as CUDA graphs, checked without a GPU: both stages' training,
    and validation graphs, traced on the ``meta`` device, pass the ``cudagraphs`` backend's own
    checks (no mutated inputs, no CPU tensors, no incompatible operator), any of which would make
    it run the step unrecorded. On ``meta`` the only complaint left is that no device is CUDA."""
    from torch._dynamo.backends import cudagraphs as cg
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    from aemt.config import load_config
    from aemt.evaluation.bench import SIMS2_DIMS, _batch
    from aemt.training.finetune import FinetuneModule
    from aemt.training.pretrain import PretrainModule

    skips, checked = [], []

    def check(kind, dynamo_inputs, graph, inputs):
        checked.append(kind)
        fixed = cg.count_tangents(graph) if kind == "bw" else cg.num_fw_fixed_arguments(len(dynamo_inputs), len(inputs))
        skip = cg.check_for_skip(graph, fixed)
        if skip is None or not skip.endswith("multiple devices: "):  # meta nodes only: fine on CUDA
            skips.append((kind, skip))
        elif node := cg.get_first_incompatible_cudagraph_node(graph):
            skips.append((kind, node.name))
        return boxed_nop(graph, inputs)

    def backend(graph, dynamo_inputs):
        return aot_autograd(**{f"{kind}_compiler": functools.partial(check, kind, dynamo_inputs)
                               for kind in ("fw", "bw", "inference")})(graph, dynamo_inputs)

    torch._dynamo.reset()
    cfg = load_config("sims2", {"model.encoder_layers": 1, "model.decoder_layers": 1, "model.cross_layers": 1,
                                "model.self_layers": 1, "model.causal_attention": True})
    for module in (PretrainModule(SIMS2_DIMS, cfg), FinetuneModule(SIMS2_DIMS, cfg)):
        module = module.to("meta")
        module.log_epoch_means = lambda *a, **k: None
        module.__dict__["forward_fn"] = common.DynamicBatchModel(module.model, backend=backend)
        module.training_step(_batch(8, 12, torch.device("meta")), 0).backward()
        module.eval()
        with torch.no_grad():
            module.validation_step(_batch(6, 12, torch.device("meta")), 0)
    assert skips == []
    assert checked == ["fw", "bw", "inference"] * 2  # the strong-positive pass reuses the validation graph


def test_compiled_blocks_keep_weights_and_serve_every_batch_size(monkeypatch):
    """``compile_scope="blocks"``: the Transformer blocks are compiled apart (the state dict keeps
    its keys), training works through them, a new batch size compiles nothing new, and in eval
    mode the outputs match eager."""
    _aot_eager(monkeypatch)
    torch.manual_seed(0)
    model = AEMT(dict(DIMS), tiny_cfg(causal_attention=True))
    keys = list(model.state_dict())
    forward = common.compile_model(model, "default", scope="blocks")
    graphs = _train_steps(forward)
    assert graphs[0] >= 1 and graphs[1:] == [graphs[0]] * 2
    assert list(model.state_dict()) == keys
    assert all(p.grad is not None for p in model.fusion.parameters())
    model.eval()
    feats, masks = make_batch()
    with torch.no_grad():
        compiled_out = forward(feats, masks).prediction
    torch._dynamo.reset()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        assert torch.allclose(compiled_out, model(feats, masks).prediction, atol=1e-5)


def test_inductor_compiles_the_pretraining_model_once_for_every_batch_size():
    """With inductor itself (not ``aot_eager``): its layout optimisation for graphs with
    convolutions used to specialise the pre-training graph to its first batch size."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = PretrainModel(dict(DIMS), tiny_cfg(encoder_layers=1))
    forward = common.compile_model(model, "default")
    _train_steps(forward, (11, 9), loss=lambda out: out.tamper_logit.sum() + sum(r.sum() for r in out.recon.values()))
    assert counters["stats"]["unique_graphs"] == 1
