"""Weights in the layout of aemt before the grouped autoencoders (one module per modality) load
into today's models: renamed or stacked exactly, and a resume of such a checkpoint is refused."""

from __future__ import annotations

import pytest
import torch
from test_models import DIMS, tiny_cfg

from aemt.config import load_config
from aemt.errors import RunError
from aemt.models import AEMT, MODALITIES, PretrainModel
from aemt.models.compat import upgrade_state_dict
from aemt.training.finetune import FinetuneModule

# keys as the per-modality models wrote them (read off aemt at commit f308a90)
OLD_KEYS = {
    ("pretrain", "transformer"): ["autoencoders.text.encoder.conv.conv.weight",
                                  "autoencoders.audio.encoder.layers.blocks.0.attn.qkv.weight",
                                  "autoencoders.vision.decoder.queries", "autoencoders.text.decoder.conv.conv.bias",
                                  "autoencoders.audio.decoder.layers.norm.weight", "tamper.mlp.0.weight"],
    ("aemt", "transformer"): ["encoders.audio.conv.conv.weight", "encoders.vision.layers.blocks.1.ffn.fc1.bias",
                              "fusion.cross.blocks.0.attn.q.weight"],
    ("pretrain", "lstm"): ["autoencoders.text.encoder.lstm.weight_ih_l0", "autoencoders.audio.decoder.conv.conv.bias"],
    ("aemt", "lstm"): ["encoders.vision.lstm.weight_hh_l0", "encoders.text.conv.conv.weight"],
}


def _old_layout(state: dict, stage: str, kind: str) -> dict:
    """``state`` as the per-modality models stored it."""
    old = {}
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part not in ("encoders", "decoders"):
            old[key] = value
            continue
        parent = f"autoencoders.{{m}}.{part[:-1]}." if stage == "pretrain" else "encoders.{m}."
        if kind == "lstm":  # <part>.<m>.<rest>
            m, sub = rest.split(".", 1)
            old[parent.format(m=m) + sub] = value
        elif rest.startswith("conv."):  # <part>.conv.<m>.<rest>
            m, sub = rest[len("conv."):].split(".", 1)
            old[parent.format(m=m) + "conv." + sub] = value
        else:  # one slice of a grouped weight per modality
            for g, m in enumerate(MODALITIES):
                old[parent.format(m=m) + rest] = value[g]
    return old


@pytest.mark.parametrize("stage,kind", list(OLD_KEYS))
def test_old_per_modality_weights_convert_exactly(stage, kind):
    torch.manual_seed(0)
    model = (PretrainModel if stage == "pretrain" else AEMT)(dict(DIMS), tiny_cfg(autoencoder=kind))
    new = model.state_dict()
    old = _old_layout(new, stage, kind)
    assert set(OLD_KEYS[(stage, kind)]) <= old.keys()
    for prefix in ("", "model."):
        upgraded = upgrade_state_dict({prefix + k: v for k, v in old.items()}, new)
        assert upgraded.keys() == {prefix + k for k in new}
        assert all(torch.equal(upgraded[prefix + k], v) for k, v in new.items())
    assert upgrade_state_dict(new, new).keys() == new.keys()  # today's layout passes unchanged
    if stage == "pretrain":  # --pretrained from an old pre-training run
        target = AEMT(dict(DIMS), tiny_cfg(autoencoder=kind))
        target.load_pretrained_encoders({f"model.{k}": v for k, v in old.items()})
        assert all(torch.equal(v, model.encoders.state_dict()[k]) for k, v in target.encoders.state_dict().items())


def test_resuming_an_old_checkpoint_is_refused_with_a_clear_error():
    cfg = load_config("synthetic", {"model.d_model": 16, "model.num_heads": 2, "model.encoder_layers": 1,
                                    "model.cross_layers": 1, "model.self_layers": 1})
    module = FinetuneModule(dict(DIMS), cfg)
    state = {f"model.{k}": v for k, v in module.model.state_dict().items()}
    module.on_load_checkpoint({"state_dict": state})  # today's layout resumes
    old = {f"model.{k}": v for k, v in _old_layout(module.model.state_dict(), "aemt", "transformer").items()}
    with pytest.raises(RunError, match="older aemt.*cannot be resumed"):
        module.on_load_checkpoint({"state_dict": old})
