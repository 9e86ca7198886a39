"""Config loading: MulT's optional dropouts, null values and their checks."""

from __future__ import annotations

import pytest

from aemt.config import load_config
from aemt.errors import ConfigError


def test_optional_mult_dropouts_fall_back_and_coerce():
    cfg = load_config("sims2")
    assert cfg.model.ffn_dropout is None and cfg.model.rate("ffn") == cfg.model.dropout
    assert cfg.model.cross_attn_rates() == (cfg.model.attn_dropout,) * 3
    cfg = load_config("sims2", {"model.ffn_dropout": "0", "model.cross_attn_dropout": "0.2, 0.1, 0"})
    assert cfg.model.rate("ffn") == 0.0 and cfg.model.cross_attn_rates() == (0.2, 0.1, 0.0)
    assert load_config("sims2", {"model.ffn_dropout": None}).model.ffn_dropout is None


@pytest.mark.parametrize("override,message", [
    ({"model.ffn_dropout": 1.5}, "model.ffn_dropout': expected in \\[0, 1\\) or null, got 1.5"),
    ({"model.cross_attn_dropout": [0.1, 0.2]}, "model.cross_attn_dropout': expected 3 values of type float"),
    ({"model.cross_attn_dropout": [0.1, 0.2, 1.0]}, "model.cross_attn_dropout': expected three rates"),
    ({"model.dropout": None}, "model.dropout': expected a value like 0.1, got null"),
    ({"model.out_dropout": "high"}, "model.out_dropout': expected a value of type float"),
    ({"data.device_resident": "yes"}, "data.device_resident': expected 'auto', 'always' or 'never', got 'yes'"),
    ({"trainer.compile_scope": "layers"}, "trainer.compile_scope': expected 'model' or 'blocks', got 'layers'"),
    ({"trainer.compile_scope": "blocks", "trainer.compile_mode": "reduce-overhead"},
     "trainer.compile_scope': expected 'model' with CUDA graphs \\(trainer.compile_mode 'reduce-overhead'"),
    ({"trainer.compile_scope": "blocks", "trainer.compile_backend": "cudagraphs"},
     "trainer.compile_scope': expected 'model' with CUDA graphs .*compile_backend 'cudagraphs'"),
    ({"trainer.compile_backend": "tvm"}, "trainer.compile_backend': expected one of \\('inductor', 'cudagraphs'\\), got 'tvm'"),
    ({"trainer.compile_backend": "cudagraphs", "trainer.compile_mode": "reduce-overhead"},
     "trainer.compile_mode': expected 'default' with trainer.compile_backend 'cudagraphs'"),
])
def test_bad_model_and_trainer_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("sims2", override)


def test_an_empty_config_file_warns_that_everything_is_default(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    with pytest.warns(UserWarning, match="empty.yaml' is empty .*every setting takes its default"):
        cfg = load_config(empty)
    assert cfg.name == "empty" and cfg.model == type(cfg.model)() and cfg.finetune == type(cfg.finetune)()
