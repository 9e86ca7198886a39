"""Damaged runs and bad inputs to evaluate/predict/score: each is one aemt error naming the file
and key, never a traceback from torch, numpy or Lightning, never silently wrong numbers."""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from test_training import TINY
from typer.testing import CliRunner

from aemt.cli import app
from aemt.data.mmsa import LABEL_KEYS
from aemt.data.synthetic import write_synthetic
from aemt.errors import AEMTError, DataError, RunError
from aemt.evaluation.metrics import compute_metrics
from aemt.evaluation.report import float_text

runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One tiny pre-training and fine-tuning run (1 epoch each), copied by the tests that damage it."""
    root = tmp_path_factory.mktemp("bad_runs")
    labeled, unlabeled = write_synthetic(root / "data", n_train=40, n_valid=12, n_test=12, n_unlabeled=40, seed=1)
    values = copy.deepcopy(TINY)
    values["pretrain"]["epochs"] = values["finetune"]["epochs"] = 1
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "tiny", **values}))
    pre, ft = root / "pre", root / "ft"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AEMT_CACHE_DIR", str(root / "cache"))
        for args in (["pretrain", "-c", config, "--data", unlabeled, "--out", pre],
                     ["finetune", "-c", config, "--data", labeled, "--out", ft, "--pretrained", pre]):
            result = runner.invoke(app, [str(a) for a in args])
            assert result.exit_code == 0, result.output
    return SimpleNamespace(config=config, labeled=labeled, unlabeled=unlabeled, pre=pre, ft=ft)


def fails(args: list, error: type[AEMTError] = RunError) -> str:
    """Run the CLI, expect one ``error``, return its message."""
    result = runner.invoke(app, [str(a) for a in args])
    assert isinstance(result.exception, error), f"{result.exception!r}\n{result.output}"
    return str(result.exception)


def copied(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / run.name))


# --- damaged weights and checkpoints ---------------------------------------------------------

def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class _Opens:
    """Pickles as a call to ``open(path, "w")``: loading it unsafely would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _reshaped(good: Path) -> bytes:
    obj = torch.load(good, weights_only=True)
    state = obj.get("state_dict", obj)
    key = next(k for k, v in state.items() if v.dim() == 2)
    state[key] = state[key].reshape(-1)
    return _saved(obj)


def _zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "hi")
    return buffer.getvalue()


NOT_READABLE = r"is not a readable aemt (weights|checkpoint) file"
DAMAGE = {  # name: (bytes from the good file and a marker path, expected message)
    "text": (lambda good, marker: b"not a model at all\n", NOT_READABLE),
    "empty": (lambda good, marker: b"", NOT_READABLE),
    "zip_not_torch": (lambda good, marker: _zip(), NOT_READABLE),
    "truncated": (lambda good, marker: good.read_bytes()[: good.stat().st_size // 2], NOT_READABLE),
    "pickled_code": (lambda good, marker: _saved({"w": _Opens(marker)}), NOT_READABLE + r".*\.open\b"),
    "list": (lambda good, marker: _saved([torch.zeros(3)]), r"holds a list"),
    "tensor": (lambda good, marker: _saved(torch.zeros(3)), r"holds a Tensor"),
    "reshaped": (lambda good, marker: _reshaped(good), r"key '[^']+': expected shape \(\d+, \d+\), got \(\d+,\)"),
}
TARGETS = ("model.pt", "last.ckpt", "pretrained")


def _damage_and_run(made, tmp_path: Path, target: str, damage: str, plain: bytes | None = None) -> str:
    """Damage the ``target`` file of a copy of a run, use it, return the error message."""
    run = copied(made.pre if target == "pretrained" else made.ft, tmp_path)
    path = run / ("checkpoints/last.ckpt" if target == "last.ckpt" else "model.pt")
    marker = tmp_path / "opened"
    path.write_bytes(plain if plain is not None else DAMAGE[damage][0](path, marker))
    if target == "model.pt":
        message = fails(["evaluate", "--run", run, "--data", made.labeled])
    elif target == "last.ckpt":
        message = fails(["finetune", "-c", made.config, "--data", made.labeled, "--out", run, "--resume",
                         "--epochs", "2"])
    else:
        message = fails(["finetune", "-c", made.config, "--data", made.labeled, "--out", tmp_path / "new",
                         "--pretrained", run])
    assert not marker.exists()
    assert str(path) in message or f"'{run}': model.pt" in message, message
    assert "weights_only" not in message
    return message


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_weights_are_one_run_error(made, tmp_path, target, damage):
    message = _damage_and_run(made, tmp_path, target, damage)
    assert re.search(DAMAGE[damage][1], message), message


@pytest.mark.parametrize("target, expected", [
    ("model.pt", r"\d+ missing keys \('encoders\.[^)]* and \d+ more\); 1 unexpected key \('a'\)"),
    ("pretrained", r"holds no encoder weights"),
    ("last.ckpt", r"key 'pytorch-lightning_version' \(a str\): missing"),
])
def test_a_dict_that_is_not_the_models_weights(made, tmp_path, target, expected):
    plain = {"state_dict": {}, "epoch": 0} if target == "last.ckpt" else {"a": torch.zeros(2)}
    message = _damage_and_run(made, tmp_path, target, "", plain=_saved(plain))
    assert re.search(expected, message), message


# --- damaged run folders ---------------------------------------------------------------------

def _edit_json(text: str | None = None, drop: str | None = None, **values):
    def edit(run: Path) -> None:
        path = run / "run.json"
        if text is not None:
            path.write_text(text)
            return
        info = json.loads(path.read_text())
        info.pop(drop, None)
        path.write_text(json.dumps({**info, **values}))
    return edit


def _edit_npz(drop: str | None = None, garbage: bool = False, **changes):
    def edit(run: Path) -> None:
        path = run / "preprocess.npz"
        if garbage:
            path.write_bytes(b"PK\x03\x04 garbage")
            return
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files if k != drop}
        for key, change in changes.items():
            arrays[key] = change(arrays[key])
        np.savez(path, **arrays)
    return edit


def _with_nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[3] = np.nan
    return a


RUN_DAMAGE = {  # name: (edit of the run folder, file named, expected message)
    "run_json_not_json": (_edit_json(text="{not json"), "run.json", r"not readable JSON"),
    "run_json_a_list": (_edit_json(text="[1, 2]"), "run.json", r"expected a JSON object, got list"),
    "run_json_no_dims": (_edit_json(drop="dims"), "run.json", r"key 'dims': missing"),
    "run_json_no_seq_len": (_edit_json(drop="seq_len"), "run.json", r"key 'seq_len': missing"),
    "run_json_bad_dims": (_edit_json(dims={"text": 64, "audio": "wide"}), "run.json", r"key 'dims': expected"),
    "npz_missing": (lambda run: (run / "preprocess.npz").unlink(), "preprocess.npz", r"not found"),
    "npz_garbage": (_edit_npz(garbage=True), "preprocess.npz", r"not a readable \.npz"),
    "npz_no_audio_std": (_edit_npz(drop="audio_std"), "preprocess.npz", r"key 'audio_std': missing"),
    "npz_short_mean": (_edit_npz(audio_mean=lambda a: a[:-1]), "preprocess.npz",
                       r"key 'audio_mean': expected shape \(25,\).*got shape \(24,\)"),
    "npz_nan_mean": (_edit_npz(text_mean=_with_nan), "preprocess.npz", r"key 'text_mean': expected finite"),
    "npz_zero_std": (_edit_npz(vision_std=lambda a: a * 0), "preprocess.npz",
                     r"key 'vision_std': expected positive values, got 0"),
}


@pytest.mark.parametrize("damage", list(RUN_DAMAGE))
def test_damaged_run_folder_is_one_run_error(made, tmp_path, damage):
    edit, name, expected = RUN_DAMAGE[damage]
    run = copied(made.ft, tmp_path)
    edit(run)
    message = fails(["evaluate", "--run", run, "--data", made.labeled])
    assert str(run / name) in message and re.search(expected, message), message


# --- prediction inputs -----------------------------------------------------------------------

def _rewritten(source: Path, out: Path, edit) -> Path:
    with open(source, "rb") as handle:
        data = pickle.load(handle)
    for part in data.values():
        edit(part)
    with open(out, "wb") as handle:
        pickle.dump(data, handle, protocol=4)
    return out


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_feature_width_differing_from_the_runs_is_one_data_error(made, tmp_path, command):
    def narrow(part):
        part["audio"] = part["audio"][..., :10]
    narrow_file = _rewritten(made.labeled, tmp_path / "narrow.pkl", narrow)
    extra = ["--out", tmp_path / "p.csv"] if command == "predict" else []
    message = fails([command, "--run", made.ft, "--data", narrow_file, *extra], DataError)
    assert str(narrow_file) in message and "key 'audio'" in message and "width 25" in message and "got 10" in message


def test_predict_on_a_file_without_labels_gives_every_clip_in_file_order(made, tmp_path):
    def unlabel(part):
        for key in (*LABEL_KEYS.values(), "classification_labels"):
            part.pop(key, None)
    no_labels = _rewritten(made.labeled, tmp_path / "no_labels.pkl", unlabel)
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", "--run", str(made.ft), "--data", str(no_labels), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with open(made.labeled, "rb") as handle:
        file_order = [i for part in pickle.load(handle).values() for i in part["id"]]
    with open(out) as handle:
        assert [row["id"] for row in csv.DictReader(handle)] == file_order  # train, valid and test: 64 clips
    assert len(file_order) == 64


@pytest.mark.parametrize("command", ["evaluate", "predict"])
@pytest.mark.parametrize("factor, expected", [(float("nan"), "hold non-finite values (NaN or inf)"),  # the weights
                                              (1e30, "gives non-finite predictions (NaN or inf) for 12 of 12")])
def test_a_model_giving_nan_is_refused(made, tmp_path, command, factor, expected):
    run = copied(made.ft, tmp_path)
    state = torch.load(run / "model.pt", weights_only=True)
    torch.save({k: v * factor for k, v in state.items()}, run / "model.pt")
    extra = ["--out", tmp_path / "p.csv"] if command == "predict" else []
    message = fails([command, "--run", run, "--data", made.labeled, *extra])
    assert str(run / "model.pt") in message and expected in message
    assert not (tmp_path / "p.csv").exists()


def test_a_pretraining_run_of_nan_weights_is_named_as_the_pretrained_option(made, tmp_path):
    pre = copied(made.pre, tmp_path)
    state = torch.load(pre / "model.pt", weights_only=True)
    torch.save({k: v * float("nan") for k, v in state.items()}, pre / "model.pt")
    message = fails(["finetune", "-c", made.config, "--data", made.labeled, "--out", tmp_path / "ft",
                     "--pretrained", pre])
    assert message.startswith(f"--pretrained '{pre}' (the pre-training run): '{pre / 'model.pt'}': weights ")
    assert "hold non-finite values" in message


@pytest.mark.parametrize("out, expected", [(".", "got an existing folder"),
                                           ("a_file/p.csv", "it is a file, not a folder")])
def test_predict_out_a_path_it_cannot_write(made, tmp_path, out, expected):
    (tmp_path / "a_file").write_text("")
    message = fails(["predict", "--run", made.ft, "--data", made.labeled, "--out", tmp_path / out], DataError)
    assert str(tmp_path / out) in message and expected in message


# --- metrics and score -----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["prediction", "label"])
def test_compute_metrics_refuses_non_finite_values(which):
    values = {"prediction": np.array([0.1, 0.2, 0.3]), "label": np.array([0.1, -0.2, 0.5])}
    values[which] = np.array([np.nan, 0.2, np.inf])
    with pytest.raises(DataError, match=rf"key '{which}'.*2 of 3 .*non-finite"):
        compute_metrics(values["prediction"], values["label"], "sims")


@pytest.mark.parametrize("kind", ["sims", "mosei"])
@pytest.mark.parametrize("pred, true", [([0.5], [0.4]), ([0.3, 0.3, 0.3], [0.1, -0.5, 0.9])],
                         ids=["one_clip", "constant"])
def test_corr_of_one_clip_or_constant_predictions_is_nan_with_a_warning(kind, pred, true):
    with pytest.warns(RuntimeWarning, match="Corr is NaN"):
        out = compute_metrics(pred, true, kind)
    assert np.isnan(out["Corr"]) and list(out)[-1] == "Corr"
    assert np.isfinite(out["MAE"])


def _csv(path: Path, rows: list[tuple[float, float]]) -> Path:
    path.write_text("prediction,label\n" + "".join(f"{p},{t}\n" for p, t in rows))
    return path


@pytest.mark.parametrize("kind, label", [("sims", 7.0), ("sims", -9.0), ("mosei", 3.5), ("mosei", -9.0)])
def test_score_refuses_labels_outside_the_metrics_range(tmp_path, kind, label):
    path = _csv(tmp_path / "p.csv", [(0.1, 0.2), (0.3, label), (0.0, -0.5)])
    message = fails(["score", path, "--metrics", kind], DataError)
    bound = "1" if kind == "sims" else "3"
    assert str(path) in message and "key 'label'" in message and f"[-{bound}, {bound}]" in message
    assert f"got {label:g} at row 2" in message


def test_score_on_a_binary_file(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"prediction,label\n" + bytes(range(128, 256)) * 4)
    message = fails(["score", path, "--metrics", "sims"], DataError)
    assert str(path) in message and "not a readable CSV" in message


def test_out_an_existing_file_is_refused_before_training(made, tmp_path):
    out = tmp_path / "a_file"
    out.write_text("keep me")
    message = fails(["finetune", "-c", made.config, "--data", made.labeled, "--out", out])
    assert f"--out '{out}' is an existing file" in message and out.read_text() == "keep me"


@pytest.mark.parametrize("command", ["pretrain", "finetune", "experiment"])
@pytest.mark.parametrize("under", [False, True])
def test_out_at_or_under_an_existing_file_is_refused(made, tmp_path, command, under):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    out = blocker / "run" if under else blocker
    args = {"pretrain": ["pretrain", "-c", made.config, "--data", made.unlabeled],
            "finetune": ["finetune", "-c", made.config, "--data", made.labeled],
            "experiment": ["experiment", Path(__file__).parents[1] / "examples" / "sensitivity.yaml"]}[command]
    message = fails([*args, "--out", out])
    where = f"lies under the existing file '{blocker}'" if under else "is an existing file"
    assert f"--out '{out}' {where}; expected a" in message and blocker.read_text() == "keep me"


def test_garbage_weights_are_not_called_code(made, tmp_path):
    run = copied(made.ft, tmp_path)
    (run / "model.pt").write_bytes(b"garbage")
    message = fails(["evaluate", "--run", run, "--data", made.labeled])
    assert "its pickle cannot be read" in message and "code" not in message and "weights_only" not in message


@pytest.mark.parametrize("content, expected", [
    (b"\x00\x01\xff\xfe", "is missing or not a readable CSV"),
    (b"a,b\n1,2\n", "the columns ['label', 'run_dir'] are missing"),
])
def test_explain_on_a_damaged_experiment_folder(tmp_path, content, expected):
    from aemt.evaluation.experiment import explain

    (tmp_path / "results.csv").write_bytes(content)
    with pytest.raises(RunError, match=re.escape(expected)):
        explain(tmp_path)


# --- what a run writes: permissions, JSON without NaN, exact predictions ---------------------

def _strict_json(text: str):
    """``json.loads`` refusing the bare NaN / Infinity that Python writes and JSON has not."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_run_files_get_the_permissions_of_a_plain_open(made):
    from aemt.io_utils import current_umask

    expected = 0o666 & ~current_umask()  # the umask the fixture's runs were written under
    for run, names in ((made.pre, ("model.pt", "config.yaml", "run.json")),
                       (made.ft, ("model.pt", "config.yaml", "run.json", "test_metrics.json", "predictions.csv"))):
        for name in names:
            assert (run / name).stat().st_mode & 0o777 == expected, (run / name, oct((run / name).stat().st_mode))
    assert made.labeled.stat().st_mode & 0o777 == expected


def test_scoring_predictions_csv_gives_the_runs_test_metrics(made):
    result = runner.invoke(app, ["score", str(made.ft / "predictions.csv"), "--metrics", "sims", "--json"])
    assert result.exit_code == 0, result.output
    assert _strict_json(result.output) == _strict_json((made.ft / "test_metrics.json").read_text())
    with open(made.ft / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    for key in ("label", "label_T", "prediction"):  # each the shortest text of its exact float32 value
        texts = [row[key] for row in rows]
        assert texts == [float_text(np.float32(t)) for t in texts], (key, texts)


def test_evaluate_json_of_an_undefined_corr_is_null(made, tmp_path):
    labeled, _ = write_synthetic(tmp_path / "one", n_train=4, n_valid=2, n_test=1, n_unlabeled=2, seed=3)
    result = runner.invoke(app, ["evaluate", "--run", str(made.ft), "--data", str(labeled), "--json"])
    assert result.exit_code == 0, result.output
    metrics = _strict_json(result.stdout)
    assert metrics["Corr"] is None and isinstance(metrics["MAE"], float)


def test_score_json_of_an_undefined_corr_is_null(tmp_path):
    result = runner.invoke(app, ["score", str(_csv(tmp_path / "p.csv", [(0.5, 0.4)])), "--metrics", "sims", "--json"])
    assert result.exit_code == 0, result.output
    metrics = _strict_json(result.stdout)
    assert metrics["Corr"] is None and metrics["MAE"] == 0.1


def test_a_checkpoint_with_a_damaged_random_state_is_refused_by_name(made, tmp_path):
    run = copied(made.ft, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["rng_states"]["torch"] = torch.zeros(3)  # not a generator state
    torch.save(checkpoint, last)
    message = fails(["finetune", "-c", made.config, "--data", made.labeled, "--out", run, "--resume", "--epochs", "2",
                     "--pretrained", made.pre])
    assert str(last) in message and "its random state ('rng_states') is damaged" in message


def test_an_undefined_metric_written_as_null_reads_back_as_nan(tmp_path):
    from aemt.io_utils import json_text
    from aemt.training.run_files import read_test_metrics

    (tmp_path / "test_metrics.json").write_text(json_text({"MAE": 0.1, "Corr": float("nan")}))
    metrics = read_test_metrics(tmp_path / "test_metrics.json")
    assert metrics["MAE"] == 0.1 and math.isnan(metrics["Corr"])


def test_evaluate_refuses_to_drop_every_modality(made):
    message = fails(["evaluate", "--run", made.ft, "--data", made.labeled,
                     "--drop", "text", "--drop", "audio", "--drop", "vision"])
    assert "cannot remove every modality" in message and "keep at least one" in message
    result = runner.invoke(app, ["evaluate", "--run", str(made.ft), "--data", str(made.labeled),
                                 "--drop", "audio", "--drop", "vision", "--json"])
    assert result.exit_code == 0, result.output


# --- predict --split on files with or without labels; the split column --------------------------

def _predicted(args: list) -> list[dict]:
    out = Path(args[args.index("--out") + 1])
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    with open(out) as handle:
        return list(csv.DictReader(handle))


def _file_ids(path: Path) -> dict[str, list[str]]:
    with open(path, "rb") as handle:
        return {name: list(part["id"]) for name, part in pickle.load(handle).items()}


def _no_labels(made, tmp_path) -> Path:
    def unlabel(part):
        for key in (*LABEL_KEYS.values(), "classification_labels"):
            part.pop(key, None)
    return _rewritten(made.labeled, tmp_path / "no_labels.pkl", unlabel)


def test_predict_split_picks_a_split_of_an_unlabeled_file(made, tmp_path):
    ids = _file_ids(made.unlabeled)
    assert list(ids) == ["train", "valid"]
    whole = _predicted(["predict", "--run", made.ft, "--data", made.unlabeled, "--out", tmp_path / "all.csv"])
    valid = _predicted(["predict", "--run", made.ft, "--data", made.unlabeled, "--out", tmp_path / "v.csv",
                        "--split", "valid"])
    assert list(valid[0]) == ["id", "split", "prediction"]
    assert [r["id"] for r in valid] == ids["valid"] and {r["split"] for r in valid} == {"valid"}
    from_whole = [float(r["prediction"]) for r in whole if r["split"] == "valid"]
    assert [float(r["prediction"]) for r in valid] == pytest.approx(from_whole, abs=1e-5)  # batched apart


def test_predict_split_test_of_a_label_less_file_with_train_valid_test(made, tmp_path):
    no_labels = _no_labels(made, tmp_path)
    rows = _predicted(["predict", "--run", made.ft, "--data", no_labels, "--out", tmp_path / "t.csv", "--split", "test"])
    assert [r["id"] for r in rows] == _file_ids(made.labeled)["test"] and {r["split"] for r in rows} == {"test"}
    whole = [r for r in _predicted(["predict", "--run", made.ft, "--data", no_labels, "--out", tmp_path / "w.csv"])
             if r["split"] == "test"]
    assert [r["id"] for r in rows] == [r["id"] for r in whole]
    assert [float(r["prediction"]) for r in rows] == pytest.approx([float(r["prediction"]) for r in whole], abs=1e-5)


def test_predict_of_a_whole_unlabeled_file_says_each_rows_split(made, tmp_path):
    no_labels = _no_labels(made, tmp_path)
    for path, name in ((made.unlabeled, "u.csv"), (no_labels, "n.csv")):
        rows = _predicted(["predict", "--run", made.ft, "--data", path, "--out", tmp_path / name])
        assert list(rows[0]) == ["id", "split", "prediction"]
        assert [(r["split"], r["id"]) for r in rows] == [(s, i) for s, ids in _file_ids(path).items() for i in ids]
    labeled = _predicted(["predict", "--run", made.ft, "--data", made.labeled, "--out", tmp_path / "l.csv"])
    assert "split" not in labeled[0]  # a labeled file gives one split, as before


@pytest.mark.parametrize("which", ["labeled", "unlabeled"])
def test_predict_an_unknown_split_names_the_files_splits(made, tmp_path, which):
    path = getattr(made, which)
    message = fails(["predict", "--run", made.ft, "--data", path, "--out", tmp_path / "p.csv", "--split", "nope"],
                    DataError)
    splits = "['train', 'valid', 'test']" if which == "labeled" else "['train', 'valid']"
    assert str(path) in message and "split 'nope'" in message and f"the file's splits are {splits}" in message
    assert message.count("split") == 3 and not (tmp_path / "p.csv").exists()
