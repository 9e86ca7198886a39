"""Experiment files and the experiment/explain options: each bad value is one ConfigError (a data
file not found: a DataError) naming the file, the key, expected vs actual. Loading only, no training."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from aemt.cli import app
from aemt.data.synthetic import write_synthetic
from aemt.errors import ConfigError, DataError
from aemt.evaluation.experiment import _data_paths, explain, load_experiment
from aemt.evaluation.experiment_file import SYNTHETIC_KEYS

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.yaml"))


def _write(folder: Path, **spec) -> Path:
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump({"base": "synthetic", "variants": ["aemt"], "seeds": 1, **spec}))
    return path


BAD = [  # spec, key named, words of the expected value and the actual one
    ({"seeds": "abc"}, "seeds", "a count >= 1", "got 'abc'"),
    ({"seeds": 2.5}, "seeds", "a count >= 1", "got 2.5"),
    ({"seeds": 0}, "seeds", "a count >= 1", "got 0"),
    ({"seeds": True}, "seeds", "a count >= 1", "got True"),
    ({"seeds": []}, "seeds", "non-empty list of distinct integers", "got []"),
    ({"seeds": [1, 2, 1]}, "seeds", "distinct integers", "got [1, 2, 1]"),
    ({"seeds": [1, "a"]}, "seeds", "distinct integers", "got [1, 'a']"),
    ({"seeds": [1, 2.5]}, "seeds", "distinct integers", "got [1, 2.5]"),
    ({"seeds": [-1]}, "seeds", "in [0, 4294967295]", "got [-1]"),
    ({"seeds": [[1]]}, "seeds", "distinct integers", "got [[1]]"),
    ({"variants": [{"myv": [1, 2]}]}, "variants[0].myv", "a mapping", "got [1, 2]"),
    ({"variants": [{"a": {}, "b": {}}]}, "variants[0]", "{name: {key: value}}", "got {'a': {}, 'b': {}}"),
    ({"variants": [3]}, "variants[0]", "a built-in variant name", "got 3"),
    ({"variants": ["aemt", "mult", "aemt"]}, "variants[2]", "each variant name once", "got 'aemt'"),
    ({"variants": []}, "variants", "a non-empty list", "got []"),
    ({"variants": "aemt"}, "variants", "a list", "got 'aemt'"),
    ({"variants": ["aemt-xl"]}, "variants[0]", "built-in: ['mult', 'aemt'", "unknown variant 'aemt-xl'"),
    ({"variants": [{"myv": {"finetune.tauu": 1}}]}, "", "cell 'myv'", "unknown config key 'finetune.tauu'"),
    ({"overrides": ["finetune.tau", 0.5]}, "overrides", "a mapping", "got ['finetune.tau', 0.5]"),
    ({"overrides": {"finetune.tau": "x"}}, "overrides", "config key 'finetune.tau'", "got 'x'"),
    ({"overrides": {1: 2}}, "overrides", "non-empty strings", "got {1: 2}"),
    ({"sweeps": {"finetune.tau": 0.5}}, "sweeps.finetune.tau", "a non-empty list", "got 0.5"),
    ({"sweeps": {"finetune.tau": []}}, "sweeps.finetune.tau", "a non-empty list", "got []"),
    ({"sweeps": {"finetune.tau": [0.1, 0.1]}}, "sweeps.finetune.tau", "distinct values", "got [0.1, 0.1]"),
    ({"sweeps": ["finetune.tau"]}, "sweeps", "a mapping", "got ['finetune.tau']"),
    ({"sweeps": {"pretrain.lambda1": [-1]}}, "", "cell 'aemt pretrain.lambda1=-1'", "pretrain.lambda1"),
    ({"sweep_variant": "nosuch", "sweeps": {"finetune.tau": [0.1]}}, "sweep_variant", "one of the variants",
     "got 'nosuch'"),
    ({"sweep_variant": "nosuch"}, "sweep_variant", "one of the variants ['mult', 'aemt'", "got 'nosuch'"),
    ({"missing_modality": "no"}, "missing_modality", "true or false", "got 'no'"),
    ({"missing_modality": 1}, "missing_modality", "true or false", "got 1"),
    ({"base": 5}, "base", "a string", "got 5"),
    ({"base": "nosuch"}, "base", "neither a preset", "'nosuch'"),
    ({"name": ["x"]}, "name", "a string", "got ['x']"),
    ({"data": "/path.pkl"}, "data", "a mapping", "got '/path.pkl'"),
    ({"data": {"labled": "good/labeled.pkl"}}, "data", "known: ['labeled', 'unlabeled', 'synthetic']",
     "unknown keys ['labled']"),
    ({"data": {"unlabeled": "u.pkl"}}, "data", "{labeled: FILE}", "got {'unlabeled': 'u.pkl'}"),
    ({"data": {"labeled": "l.pkl", "synthetic": {}}}, "data", "{synthetic: {...}}", "got {'labeled'"),
    ({"data": {"labeled": 3}}, "data.labeled", "a string", "got 3"),
    ({"data": {"synthetic": {"n_trian": 10}}}, "data.synthetic", "'n_train'", "unknown keys ['n_trian']"),
    ({"data": {"synthetic": {"n_train": "10"}}}, "data.synthetic.n_train", "an integer or null", "got '10'"),
    ({"data": {"synthetic": [1]}}, "data.synthetic", "a mapping", "got [1]"),
    ({"seed": 3}, "", "known: ['name', 'base'", "unknown keys ['seed']"),
]


@pytest.mark.parametrize("spec, key, expected, got", BAD, ids=[f"{i}-{c[1] or 'top'}" for i, c in enumerate(BAD)])
def test_bad_values_are_one_clear_config_error(tmp_path, spec, key, expected, got):
    path = _write(tmp_path, **spec)
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    message = str(info.value)
    where = f"experiment '{path}'" + (f", key '{key}':" if key else ":")
    assert message.startswith(where) and expected in message and got in message, message


@pytest.mark.parametrize("name", ["labeled", "unlabeled"])
@pytest.mark.parametrize("absolute", [True, False])
def test_a_data_file_not_found_is_a_data_error(tmp_path, name, absolute):
    (tmp_path / "l.pkl").write_bytes(b"")
    missing = str(tmp_path / "nope.pkl") if absolute else "nope.pkl"
    path = _write(tmp_path, data={"labeled": "l.pkl", name: missing})
    with pytest.raises(DataError) as info:
        load_experiment(path)
    assert str(info.value).startswith(f"file '{path}', key 'data.{name}': expected an existing data file, "
                                      f"got '{tmp_path / 'nope.pkl'}'"), str(info.value)


def test_data_paths_are_relative_to_the_experiment_file(tmp_path, monkeypatch):
    folder = tmp_path / "exp"
    folder.mkdir()
    for name in ("l.pkl", "u.pkl"):
        (folder / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    exp = load_experiment(Path("exp") / _write(folder, data={"labeled": "l.pkl"}).name)
    assert _data_paths(exp, tmp_path / "out") == (folder / "l.pkl", folder / "l.pkl")  # pre-trains on labeled
    exp = load_experiment(Path("exp") / _write(folder, data={"labeled": "l.pkl", "unlabeled": "u.pkl"}).name)
    assert _data_paths(exp, tmp_path / "out") == (folder / "l.pkl", folder / "u.pkl")


def test_bad_synthetic_arguments_name_the_experiment_file(tmp_path):
    path = _write(tmp_path, data={"synthetic": {"n_train": 0}})
    exp = load_experiment(path)  # ranges are the generator's to check, before it writes anything
    with pytest.raises(DataError, match=rf"^file '{path}', key 'data.synthetic': n_train must be at least 1, got 0"):
        _data_paths(exp, tmp_path / "out")
    assert not (tmp_path / "out" / "data" / "labeled.pkl").exists()


def test_synthetic_keys_are_write_synthetics_arguments():
    assert list(SYNTHETIC_KEYS) == list(inspect.signature(write_synthetic).parameters)[1:]


def test_good_values(tmp_path):
    exp = load_experiment(_write(tmp_path, seeds=[7, 3], variants=[], sweeps={"finetune.tau": [0.1, 0.2]},
                                 data={"synthetic": {"n_train": None, "nonfinite_rate": 0}},
                                 sweep_variant="mult", missing_modality=False, overrides=None))
    assert exp.seeds == [7, 3] and not exp.variants and not exp.missing_modality and exp.overrides == {}
    assert [c.label for c in exp.cells()] == ["mult finetune.tau=0.1"] * 2 + ["mult finetune.tau=0.2"] * 2
    exp = load_experiment(_write(tmp_path, variants=[{"sharp": {"finetune.tau": 0.1}}], sweep_variant="sharp",
                                 sweeps={"finetune.lambda2": [0.5]}, data=None), seeds=3, epochs=2)
    assert exp.seeds == [1111, 1112, 1113] and exp.data == {} and exp.overrides["finetune.epochs"] == 2
    assert all(c.config.finetune.tau == 0.1 for c in exp.cells())
    assert load_experiment(_write(tmp_path, seeds=[5, 6, 7]), seeds=2).seeds == [5, 6]


@pytest.mark.parametrize("option, value", [("seeds", -1), ("seeds", 0), ("epochs", 0), ("epochs", -2)])
def test_seeds_and_epochs_options_are_at_least_one(tmp_path, option, value):
    path = _write(tmp_path, seeds=3)
    with pytest.raises(ConfigError, match=rf"^--{option}: expected an integer >= 1, got {value}$"):
        load_experiment(path, **{option: value})
    args = ["experiment", str(path), "--out", str(tmp_path / "out"), f"--{option}", str(value)]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ConfigError) and f"--{option}" in str(result.exception)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n", [0, -3])
def test_explain_refuses_fewer_than_one_clip(tmp_path, n):
    with pytest.raises(ConfigError, match=rf"^--n: expected an integer >= 1, got {n}$"):
        explain(tmp_path, n=n)
    result = CliRunner().invoke(app, ["explain", "--experiment", str(tmp_path), "--n", str(n)])
    assert isinstance(result.exception, ConfigError), result.output


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_load(path):
    exp = load_experiment(path)
    assert exp.cells() and exp.data.get("synthetic")
