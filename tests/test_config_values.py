"""Config values: ranges Lightning, torch and numpy would only refuse deep in a run, non-finite
floats, no silent coercion, and errors that name the file or the override they came from."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from aemt.cli.train_commands import resolve
from aemt.config import PRESETS, Config, apply_overrides, load_config, save_config
from aemt.errors import ConfigError
from aemt.evaluation.experiment import load_experiment

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def _float_keys() -> list[str]:
    """Every float (or optional float) field of a config, as a dotted key."""
    cfg, keys = Config(), []
    for section in ("data", "model", "pretrain", "finetune", "trainer"):
        for f in dataclasses.fields(getattr(cfg, section)):
            if isinstance(f.metadata.get("like", getattr(getattr(cfg, section), f.name)), float):
                keys.append(f"{section}.{f.name}")
    return keys


@pytest.mark.parametrize("key,value,expected", [
    ("trainer.devices", 0, ">= 1"),
    ("trainer.devices", -1, ">= 1"),
    ("trainer.num_nodes", 0, ">= 1"),
    ("trainer.precision", "fp8", "one of 'auto', '64-true'"),
    ("trainer.precision", "transformer-engine", "one of 'auto'"),
    ("trainer.accelerator", "banana", "one of 'auto', 'cpu', 'gpu', 'cuda', 'mps'"),
    ("trainer.accelerator", "tpu", "one of 'auto', 'cpu'"),
    ("trainer.seed", -1, r"in \[0, 4294967295\]"),
    ("trainer.seed", 99999999999, r"in \[0, 4294967295\]"),
    ("trainer.lr_factor", 2.0, r"in \(0, 1\)"),
    ("trainer.lr_factor", 0.0, r"in \(0, 1\)"),
    ("trainer.lr_factor", 1.0, r"in \(0, 1\)"),
    ("pretrain.weight_decay", -1.0, ">= 0"),
    ("finetune.weight_decay", -0.1, ">= 0"),
    ("trainer.grad_clip", -1.0, ">= 0"),
    ("pretrain.patience", -1, ">= 0"),
    ("finetune.patience", -1, ">= 0"),
    ("trainer.lr_patience", -3, ">= 0"),
    ("model.encoder_layers", -1, ">= 0"),
    ("model.decoder_layers", -1, ">= 0"),
    ("model.cross_layers", -1, ">= 0"),
    ("model.self_layers", -2, ">= 0"),
    ("model.decoder_layers", 0, ">= 1 with model.autoencoder 'transformer' and model.decoder_input 'queries'"),
    ("trainer.compile_mode", "fast", "one of 'default', 'reduce-overhead'"),
    ("model.conv_padding", "full", "'same' or 'valid'"),
    ("model.conv_padding", "valid", r"'same', or 'valid' \(MMSA's MulT\) only for the MulT baseline: finetune.pretrained 'none'"),
])
def test_out_of_range_values_name_key_expected_and_actual(key, value, expected):
    with pytest.raises(ConfigError, match=f"^override: config key '{key}': expected {expected}.*, got {value!r}$"):
        load_config("sims2", {key: value})


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf"])
def test_every_float_must_be_finite(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}': expected a finite number, got (-?inf|nan)$"):
        load_config("sims2", {key: value})


def test_float_keys_cover_the_audited_hyper_parameters():
    assert {"pretrain.lr", "pretrain.lambda1", "finetune.lr", "finetune.tau", "finetune.neutral_band",
            "trainer.grad_clip", "trainer.lr_factor", "model.ffn_dropout"} <= set(_float_keys())
    with pytest.raises(ConfigError, match=r"model.cross_attn_dropout': expected a finite number, got \(0.1, inf, 0.1\)"):
        load_config("sims2", {"model.cross_attn_dropout": [0.1, math.inf, 0.1]})


@pytest.mark.parametrize("key,value,expected", [
    ("model.conv_kernels", [5.5, 1, 1], r"3 values of type int \(like \[5, 1, 1\]\), got \[5.5, 1, 1\]"),
    ("model.conv_kernels", [True, 1, 1], "3 values of type int"),
    ("model.conv_kernels", "5.5, 1, 1", "3 values of type int"),
    ("model.conv_kernels", [3, 1], r"3 values of type int \(like \[5, 1, 1\]\), got \[3, 1\]"),
    ("model.encoder_layers", 2.5, "a value of type int"),
    ("model.encoder_layers", True, "a value of type int"),
    ("trainer.seed", math.inf, "a value of type int"),
    ("trainer.devices", "auto", "a value of type int"),
    ("trainer.progress", 2, r"a value of type bool \(true or false\)"),
    ("trainer.progress", 1.0, r"a value of type bool \(true or false\)"),
    ("trainer.deterministic", "maybe", r"a value of type bool \(true or false\)"),
    ("finetune.sp_stop_grad", [True], r"a value of type bool \(true or false\)"),
    ("finetune.pretrained", ["a", "b"], "a value of type str"),
    ("trainer.accelerator", True, r"a value of type str \(like 'auto'\), got True \(YAML reads a bare yes"),
    ("data.cache_dir", True, "a value of type str"),
    ("pretrain.lr", True, "a value of type float"),
    ("pretrain.lr", 10 ** 400, "a value of type float"),
])
def test_ill_typed_values_are_refused_not_coerced(key, value, expected):
    with pytest.raises(ConfigError, match=f"^override: config key '{key}': expected {expected}"):
        load_config("sims2", {key: value})


@pytest.mark.parametrize("key,value,stored", [
    ("model.conv_kernels", [5.0, 1, 1], (5, 1, 1)),
    ("model.conv_kernels", "3, 1, 1", (3, 1, 1)),
    ("trainer.progress", 0, False),
    ("trainer.progress", 1, True),
    ("trainer.progress", "off", False),
    ("trainer.deterministic", "true", True),
    ("data.cache_dir", False, "off"),  # YAML reads a bare `off` as false
    ("data.cache_dir", "/tmp/c", "/tmp/c"),
    ("trainer.precision", 16, "16"),  # YAML's int: one of Lightning's aliases
    ("trainer.precision", "bf16", "bf16"),
    ("trainer.precision", "bf16-true", "bf16-true"),
    ("trainer.accelerator", "mps", "mps"),
    ("trainer.accelerator", "cuda", "cuda"),
    ("trainer.seed", 0, 0),
    ("trainer.seed", 2**32 - 1, 2**32 - 1),
    ("trainer.seed", 7.0, 7),
    ("trainer.grad_clip", 0, 0.0),
    ("trainer.lr_factor", 0.1, 0.1),
    ("trainer.compile_mode", "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
    ("pretrain.patience", 0, 0),
    ("finetune.weight_decay", "1e-4", 1e-4),  # YAML 1.1 reads 1e-4 as a string
    ("model.encoder_layers", 0, 0),  # MulT's input stage (the "mult" variant)
    ("model.cross_layers", 0, 0),
    ("model.self_layers", 0, 0),
])
def test_valid_values_are_kept(key, value, stored):
    cfg = load_config("sims2", {key: value})
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == stored
    assert type(getattr(getattr(cfg, section), name)) is type(stored)


@pytest.mark.parametrize("overrides", [
    {"model.decoder_layers": 0, "model.autoencoder": "lstm"},
    {"model.decoder_layers": 0, "model.decoder_input": "memory"},
])
def test_decoder_without_layers_where_it_still_reads_the_encoders(overrides):
    assert load_config("sims2", overrides).model.decoder_layers == 0


def test_mmsa_input_stage_for_the_mult_baseline():
    cfg = load_config("sims2", {"model.conv_padding": "valid", "model.position_embeddings": False,
                                "finetune.pretrained": "none"})
    assert cfg.model.conv_padding == "valid" and cfg.model.position_embeddings is False
    with pytest.raises(ConfigError, match=r"data.seq_len >= the largest kernel \(5\)"):
        load_config("sims2", {"model.conv_padding": "valid", "finetune.pretrained": "none", "data.seq_len": 4})


def _yaml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "trainer": {"accelerator": "cpu"}}) + text)
    return path


@pytest.mark.parametrize("text,message", [
    ("bogus: 1\n", "unknown config key 'bogus'"),
    ("model: {encoder_layers: 2.5}\n", "config key 'model.encoder_layers': expected a value of type int"),
    ("data: {standardize: 2}\n", "config key 'data.standardize': expected a value of type bool"),
    ("pretrain: {lr: .inf}\n", "config key 'pretrain.lr': expected a finite number, got inf"),
    ("finetune: {tau: .nan}\n", "config key 'finetune.tau': expected a finite number, got nan"),
    ("model: {d_model: 32}\n", "config key 'model.num_heads': expected a divisor of model.d_model=32, got 10"),
])
def test_errors_from_a_yaml_file_name_it(tmp_path, text, message):
    path = _yaml_file(tmp_path, text)
    with pytest.raises(ConfigError, match=f"^config file '{path}': {message}"):
        load_config(path)


def test_errors_from_overrides_say_so(tmp_path):
    path = _yaml_file(tmp_path, "")
    with pytest.raises(ConfigError, match=r"^override: unknown config key 'bogus'"):
        load_config(path, {"bogus": 1})
    with pytest.raises(ConfigError, match=r"^--set: config key 'trainer.devices': expected >= 1, got 0$"):
        load_config(path, {"trainer.devices": 0}, origin="--set")
    # a value of the file that no longer fits an override names the overrides
    with pytest.raises(ConfigError, match=r"^override model.d_model=32: config key 'model.num_heads': expected a divisor"):
        apply_overrides(load_config("sims2"), {"model.d_model": 32})


@pytest.mark.parametrize("pair,message", [
    ("trainer.devices=0", "config key 'trainer.devices': expected >= 1, got 0"),
    ("trainer.progress=2", "config key 'trainer.progress': expected a value of type bool"),
    ("pretrain.lr=.inf", "config key 'pretrain.lr': expected a finite number, got inf"),
    ("trainer.precision=fp8", "config key 'trainer.precision': expected one of"),
    ("bogus=1", "unknown config key 'bogus'"),
])
def test_cli_set_values_get_one_clear_error(tmp_path, pair, message):
    with pytest.raises(ConfigError, match=rf"^command line \(--set\): {message}"):
        resolve(str(_yaml_file(tmp_path, "")), "pretrain", None, None, None, None, [pair])


def test_cli_set_cache_dir_off_turns_the_cache_off(tmp_path):
    cfg = resolve(str(_yaml_file(tmp_path, "data: {cache_dir: off}\n")), "pretrain", None, None, None, None, [])
    assert cfg.data.cache_dir == "off"
    assert resolve("sims2", "pretrain", None, None, None, None, ["data.cache_dir=off"]).data.cache_dir == "off"


def test_saved_configs_load_back(tmp_path):
    cfg = load_config("synthetic", {"data.cache_dir": False, "trainer.precision": 16, "trainer.seed": 2**32 - 1})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_are_valid(preset):
    assert load_config(preset).name == preset


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_experiments_and_their_cells_are_valid(path):
    assert load_experiment(path).cells()


def test_a_command_line_error_names_the_options_given():
    with pytest.raises(ConfigError, match=r"^command line \(--set\): config key 'model.d_model'"):
        resolve("sims2", "pretrain", None, None, None, None, ["model.d_model=0"])
    with pytest.raises(ConfigError, match=r"^command line \(--epochs\): config key 'pretrain.epochs'"):
        resolve("sims2", "pretrain", 0, None, None, None, [])
