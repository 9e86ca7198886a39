"""What aemt writes: file and folder permissions under the umask, JSON without NaN, prediction
CSVs that score as the run did, and the workers' warning format."""

from __future__ import annotations

import csv
import json
import math
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from aemt.cli.data_commands import read_predictions_csv
from aemt.config import load_config, save_config
from aemt.data.cache import cached_digest, read_entry, write_entry
from aemt.data.mmsa import MODALITIES, Split
from aemt.data.synthetic import write_synthetic
from aemt.evaluation.metrics import compute_metrics
from aemt.evaluation.predict import write_predictions, write_test_metrics
from aemt.evaluation.workers import RunTask, _WorkerPool
from aemt.io_utils import atomic_write_bytes, atomic_write_text, current_umask, json_text, one_line_warning
from aemt.training.run_files import save_state_dict


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["022", "077", "002"])
def umask(request):
    """Run the test under this umask, then restore the old one."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _split(n: int = 3, labels: np.ndarray | None = None) -> Split:
    return Split(name="test", features={m: np.zeros((n, 2, 3), np.float32) for m in MODALITIES},
                 lengths={m: np.ones(n, np.int64) for m in MODALITIES}, ids=[f"clip_{i}" for i in range(n)],
                 raw_text=["a"] * n,
                 labels={k: np.full(n, -1 / 3, np.float32) if labels is None else labels for k in "MTAV"})


# --- permissions -----------------------------------------------------------------------------

def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path, umask):
    expected = 0o666 & ~umask
    atomic_write_text(tmp_path / "a.txt", "hi")
    atomic_write_bytes(tmp_path / "sub" / "b.bin", b"hi")
    save_config(load_config("synthetic"), tmp_path / "run" / "config.yaml")
    save_state_dict(torch.nn.Linear(2, 1), tmp_path / "run" / "model.pt")
    labeled, unlabeled = write_synthetic(tmp_path / "data", n_train=4, n_valid=2, n_test=2, n_unlabeled=4)
    write_test_metrics(tmp_path / "run" / "test_metrics.json", _split(), np.zeros(3, np.float32), "sims")
    write_predictions(tmp_path / "run" / "predictions.csv", _split(), np.zeros(3, np.float32))
    for path in ("a.txt", "sub/b.bin", "run/config.yaml", "run/model.pt", "run/test_metrics.json",
                 "run/predictions.csv", labeled, unlabeled):
        assert mode(tmp_path / path) == expected, (path, oct(mode(tmp_path / path)))
    assert mode(tmp_path / "sub") == 0o777 & ~umask
    assert sorted(p.name for p in tmp_path.rglob(".*.tmp")) == []  # no temp files left


def test_an_overwritten_file_gets_them_too(tmp_path, umask):
    path = tmp_path / "a.txt"
    path.write_text("old")
    os.chmod(path, 0o600)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o666 & ~umask


def test_a_cache_entry_folder_gets_the_permissions_of_mkdir(tmp_path, umask):
    root = tmp_path / "cache"
    source = tmp_path / "source.bin"
    source.write_bytes(b"data")
    cached_digest(source, root)
    folder = root / "entry"
    write_entry(folder, {"test": _split()})
    assert mode(folder) == 0o777 & ~umask
    assert mode(root) == 0o777 & ~umask
    for path in [*folder.iterdir(), root / "digests.json"]:
        assert mode(path) == 0o666 & ~umask, path
    splits, _ = read_entry(folder)
    assert splits["test"].ids == ["clip_0", "clip_1", "clip_2"]
    assert [p.name for p in root.iterdir() if p.name.startswith("entry.")] == []  # no temp folder left


# --- JSON ------------------------------------------------------------------------------------

def _strict(text: str):
    """``json.loads`` that refuses NaN and infinities, as any other JSON reader does."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_json_text_writes_non_finite_numbers_as_null():
    value = {"Corr": float("nan"), "MAE": 0.5, "rows": [{"x": float("inf")}, (float("-inf"), 1)], "n": 3, "s": "NaN"}
    with pytest.raises(ValueError, match="not JSON: NaN"):
        _strict(json.dumps(value))
    assert _strict(json_text(value)) == {"Corr": None, "MAE": 0.5, "rows": [{"x": None}, [None, 1]], "n": 3, "s": "NaN"}
    assert _strict(json_text({"a": np.float64("nan")}, indent=2)) == {"a": None}
    assert value["Corr"] != value["Corr"]  # the input is left as it was


def test_test_metrics_json_with_an_undefined_corr_is_valid_json(tmp_path):
    path = tmp_path / "test_metrics.json"
    with pytest.warns(RuntimeWarning, match="Corr is NaN"):
        metrics = write_test_metrics(path, _split(1), np.array([0.2], np.float32), "sims")
    assert math.isnan(metrics["Corr"])
    saved = _strict(path.read_text())
    assert saved["Corr"] is None and saved["MAE"] == metrics["MAE"]


# --- predictions CSV -------------------------------------------------------------------------

def test_predictions_csv_holds_the_exact_numbers_and_scores_as_the_run(tmp_path):
    # 4-decimal labels (-0.3333) gave Corr 0.7023 here instead of the run's 0.7024
    labels = np.array([-1 / 3, 1 / 3, 2 / 3, -0.8], np.float32)
    predictions = np.array([-0.73, 0.443, 0.051, -0.38], np.float32)
    split = _split(4, labels)
    path = tmp_path / "predictions.csv"
    write_predictions(path, split, predictions)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for key, values in (("label", labels), ("label_T", labels), ("prediction", predictions)):
        assert np.array([r[key] for r in rows], dtype=np.float32).tolist() == values.tolist()
    pred, label = read_predictions_csv(path)
    assert compute_metrics(pred, label, "sims") == write_test_metrics(tmp_path / "m.json", split, predictions, "sims")


# --- warnings in workers ---------------------------------------------------------------------

@dataclass(frozen=True)
class _WarningTask(RunTask):
    """A run that only warns (imported by name in the spawned worker)."""

    def run(self) -> None:
        warnings.warn("from inside the worker", UserWarning)


@pytest.mark.parametrize("one_line", [True, False])
def test_workers_print_warnings_in_the_parents_format(tmp_path, capfd, monkeypatch, one_line):
    if one_line:  # as `aemt` (cli.app.main) sets it
        monkeypatch.setattr(warnings, "formatwarning", one_line_warning)
    cfg = load_config("synthetic")
    tasks = [_WarningTask("finetune", f"warns {i}", cfg, tmp_path / "d.pkl", tmp_path / f"run{i}") for i in range(2)]
    logs: list[str] = []
    _WorkerPool(2, [], 1, logs.append).run(tasks)
    err = capfd.readouterr().err
    if one_line:
        assert err.count("from inside the worker") == err.count("warning: from inside the worker\n") == 2, err
        assert "UserWarning" not in err and "warnings.warn(" not in err, err
    else:  # the Python API keeps Python's format
        assert err.count("UserWarning: from inside the worker") == 2, err
    assert len(logs) == 2
