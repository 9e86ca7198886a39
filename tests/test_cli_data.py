"""`aemt data synth|inspect` and `aemt score`, run in-process with Typer's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from aemt.cli import app
from aemt.data.dataset import load_labeled, load_unlabeled
from aemt.errors import DataError
from aemt.evaluation.metrics import compute_metrics
from conftest import make_labeled, write_pickle

runner = CliRunner()


def test_synth_then_inspect(tmp_path):
    out = tmp_path / "synth"
    result = runner.invoke(app, ["data", "synth", str(out), "--n-train", "40", "--n-valid", "10",
                                 "--n-test", "12", "--n-unlabeled", "30", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert (out / "labeled.pkl").is_file() and (out / "unlabeled.pkl").is_file()
    result = runner.invoke(app, ["data", "inspect", str(out / "labeled.pkl"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["splits"]["train"]["clips"] == 40 and report["splits"]["test"]["clips"] == 12
    assert set(report["splits"]["train"]["label_histograms"]) == {"M", "T", "A", "V"}
    assert sum(report["splits"]["valid"]["label_histograms"]["M"].values()) == 10
    table = runner.invoke(app, ["data", "inspect", str(out / "unlabeled.pkl")])
    assert table.exit_code == 0 and "unlabeled" in table.output and "audio" in table.output
    # the loader accepts both files
    assert load_labeled(out / "labeled.pkl", seq_len=8, metrics="sims")["test"].n == 12
    unl = load_unlabeled(out / "unlabeled.pkl", seq_len=8)
    assert unl["train"].n + unl["valid"].n == 30


def test_inspect_bad_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"garbage")
    result = runner.invoke(app, ["data", "inspect", str(bad)])
    assert result.exit_code != 0 and "not a readable pickle" in str(result.exception)


def test_score_json_equals_metrics(tmp_path):
    rng = np.random.default_rng(0)
    pred, label = rng.uniform(-1, 1, 30), np.round(rng.uniform(-1, 1, 30), 1)
    csv = tmp_path / "p.csv"
    csv.write_text("id,prediction,label\n" + "".join(f"c{i},{p},{t}\n" for i, (p, t) in enumerate(zip(pred, label))))
    result = runner.invoke(app, ["score", str(csv), "--metrics", "sims", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == compute_metrics(pred, label, "sims")
    table = runner.invoke(app, ["score", str(csv), "--metrics", "mosei"])
    assert table.exit_code == 0 and "Has0_acc_2" in table.output


def test_score_missing_column(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("pred,label\n0.1,0.2\n")
    result = runner.invoke(app, ["score", str(csv), "--metrics", "sims"])
    assert result.exit_code != 0 and "key 'prediction'" in str(result.exception)


def test_score_reads_a_bom_and_refuses_a_repeated_column(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_bytes("\ufeffprediction,label\n0.5,0.6\n-0.2,-0.4\n".encode("utf-8"))  # as spreadsheets save it
    result = runner.invoke(app, ["score", str(csv), "--metrics", "sims", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == compute_metrics(np.array([0.5, -0.2]), np.array([0.6, -0.4]), "sims")
    csv.write_text("prediction,label,prediction\n0.5,0.6,0.1\n")
    result = runner.invoke(app, ["score", str(csv), "--metrics", "sims"])
    assert "column 'prediction' appears 2 times" in str(result.exception)
    result = runner.invoke(app, ["score", str(tmp_path), "--metrics", "sims"])
    assert "expected a file, got a folder" in str(result.exception)


@pytest.mark.parametrize("args, message", [
    (["--n-train", "0"], "--n-train must be at least 1, got 0"),
    (["--n-valid", "-2"], "--n-valid must be at least 1, got -2"),
    (["--n-test", "0"], "--n-test must be at least 1, got 0"),
    (["--n-unlabeled", "1"], "--n-unlabeled must be at least 2, got 1"),
    (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["--preset", "mosi"], "--preset: unknown synthetic preset 'mosi'"),
    (["--scale", "huge"], "--scale: unknown synthetic scale 'huge'"),
])
def test_synth_errors_name_the_cli_option(tmp_path, args, message):
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "out"), *args])
    assert isinstance(result.exception, DataError) and str(result.exception).startswith(message), result.exception
    assert not (tmp_path / "out").exists()


def test_inspect_tells_how_training_reads_train_valid_test_without_labels(tmp_path):
    data = make_labeled()
    for part in data.values():
        for key in [k for k in part if k.startswith("regression")]:
            part.pop(key)
    path = str(write_pickle(tmp_path / "u.pkl", data))
    result = runner.invoke(app, ["data", "inspect", path, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert list(report["splits"]) == ["train", "valid", "test"] and report["splits"]["test"]["clips"] == 6
    assert report["left_out_of_pretraining_splits"] == ["test"] and report["kind"] != "unlabeled"
    assert len(report["warnings"]) == 1 and "read as a labeled file" in report["warnings"][0]
    with pytest.warns(UserWarning, match="read as a labeled file"):  # what pre-training says
        assert set(load_unlabeled(path, seq_len=4).splits) == {"train", "valid"}
    table = runner.invoke(app, ["data", "inspect", path])
    assert table.exit_code == 0, table.output
    assert "left out of pre-training: test (6 clips)" in table.output
    assert "warning: file" in table.output and "read as a labeled file" in table.output
