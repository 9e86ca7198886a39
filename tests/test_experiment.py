"""Experiment grids: expansion, shared/skipped runs, summary statistics, missing modalities."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from aemt.cli import app
from aemt.config import load_config
from aemt.data.mmsa import Split
from aemt.errors import ConfigError, DataError, RunError
from aemt.evaluation import experiment as experiment_mod
from aemt.evaluation.experiment import explain, load_experiment, run_experiment, write_report
from aemt.evaluation.predict import predict_split
from aemt.evaluation.report import read_csv, summarize
from aemt.evaluation.workers import RunTask, run_tasks
from aemt.models import AEMTOutput
from test_training import TINY


def _write(tmp_path, **spec):
    base = tmp_path / "tiny.yaml"
    base.write_text(yaml.safe_dump({"name": "tiny", **TINY}))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny.yaml", **spec}, sort_keys=False))
    return path


def test_grid_expands_as_declared(tmp_path):
    path = _write(tmp_path, seeds=[1, 2, 3], variants=["mult", "aemt", {"sharp": {"finetune.tau": 0.1}}],
                  sweeps={"pretrain.lambda1": [0.0, 0.8], "finetune.lambda2": [0.5]})
    exp = load_experiment(path)
    cells = exp.cells()
    assert len(cells) == (3 + 3) * 3
    labels = list(dict.fromkeys(c.label for c in cells))
    assert labels == ["mult", "aemt", "sharp", "aemt pretrain.lambda1=0.0", "aemt pretrain.lambda1=0.8",
                      "aemt finetune.lambda2=0.5"]
    mult = [c for c in cells if c.label == "mult"][0]
    assert mult.config.finetune.pretrained == "none" and mult.config.finetune.lambda2 == 0 and not mult.uses_pretraining
    sweep = [c for c in cells if c.label == "aemt pretrain.lambda1=0.8"][0]
    assert sweep.config.pretrain.lambda1 == 0.8 and sweep.config.model.d_model == 16
    assert sorted({c.seed for c in cells}) == [1, 2, 3]
    # aemt and sharp share pre-training (same pretrain config and seed); lambda1 sweeps do not
    by = {(c.label, c.seed): c for c in cells}
    assert by[("aemt", 1)].pretrain_key() == by[("sharp", 1)].pretrain_key() == by[("aemt finetune.lambda2=0.5", 1)].pretrain_key()
    assert by[("aemt", 1)].pretrain_key() != by[("aemt pretrain.lambda1=0.8", 1)].pretrain_key()
    assert by[("aemt", 1)].pretrain_key() != by[("aemt", 2)].pretrain_key()
    quick = load_experiment(path, seeds=1, epochs=1)
    assert len(quick.cells()) == 6 and all(c.config.finetune.epochs == 1 for c in quick.cells())
    assert load_experiment(_write(tmp_path, seeds=2)).variants.keys() == experiment_mod.VARIANTS.keys()


def test_bad_experiment_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown variant 'aemt-xl'"):
        load_experiment(_write(tmp_path, variants=["aemt-xl"]))
    with pytest.raises(ConfigError, match="pretrain.lambda1"):
        load_experiment(_write(tmp_path, sweeps={"pretrain.lambda1": [-1]}))


def test_experiment_runs_skips_finished_and_summarizes(tmp_path, monkeypatch):
    path = _write(tmp_path, seeds=2, variants=["mult", "aemt", "aemt-no-cl"],
                  data={"synthetic": {"n_train": 40, "n_valid": 12, "n_test": 16, "n_unlabeled": 40}},
                  sweeps={"finetune.lambda2": [0.0, 1.5]})
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(app, ["experiment", str(path), "--out", str(out), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "results.csv")
    assert len(rows) == 5 * 2
    # aemt-no-cl and "aemt finetune.lambda2=0.0" are the same config: one shared run
    assert len({r["run_dir"] for r in rows}) == 4 * 2
    assert len(list((out / "pretrain").iterdir())) == 2  # one pre-training per seed, shared by 3 labels
    for name in ("summary.md", "missing_modality.csv", "plots/scatter.png", "plots/sensitivity_finetune_lambda2.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "plots" / "curves").glob("*.png"))) == 8 + 2  # fine-tuning + pre-training runs
    # summary mean/std equal numpy's on the CSV
    summary = summarize(rows)
    for label in ("mult", "aemt"):
        values = np.array([float(r["Mult_acc_2"]) for r in rows if r["label"] == label]) * 100
        mean, std, n = summary[label]["Mult_acc_2"]
        assert n == 2 and mean == pytest.approx(values.mean()) and std == pytest.approx(values.std(ddof=1))
    for label in ("mult", "aemt", "aemt-no-cl", "aemt finetune.lambda2=1.5"):  # whole in the terminal table
        assert f"│ {label} " in result.output, label
    text = (out / "summary.md").read_text()
    assert "**" in text and "Case study" in text and "Missing modalities" in text
    assert f"Predictions of each model's first seed (seed {rows[0]['seed']})." in text
    # a rerun trains nothing
    calls = []
    monkeypatch.setattr("aemt.training.finetune.finetune", lambda *a, **k: calls.append(a))
    monkeypatch.setattr("aemt.training.pretrain.pretrain", lambda *a, **k: calls.append(a))
    configs = sorted(p.name for p in (out / "configs").glob("*.yaml"))
    for stale in (out / "configs" / "mult-0123456789-s7.yaml", out / "plots" / "curves" / "runs-mult-0123456789-s7.png",
                  out / "plots" / "curves" / "pretrain-0123456789-s7.png"):
        stale.write_text("written by an earlier grid")
    (out / "configs" / "my_notes.yaml").write_text("the user's own file")
    configs.append("my_notes.yaml")
    rows2 = run_experiment(load_experiment(path, epochs=1), out, log=lambda m: None)
    assert calls == [] and [r["Corr"] for r in rows2] == [float(r["Corr"]) for r in rows]
    write_report(load_experiment(path, epochs=1), rows2, out, log=lambda m: None)
    assert sorted(p.name for p in (out / "configs").glob("*.yaml")) == sorted(configs)  # the stale one is gone
    assert len(list((out / "plots" / "curves").glob("*.png"))) == 8 + 2
    # explain from elsewhere, after the folder moved: run folders are recorded relative to it
    moved = tmp_path / "moved"
    out.rename(moved)
    monkeypatch.chdir(moved / "runs")
    cases = explain(moved, n=3)
    assert [list(c)[:3] for c in cases] == [["id", "text", "label"]] * 3
    predictions = {r["id"]: r for r in read_csv(moved / rows[0]["run_dir"] / "predictions.csv")}
    assert all(c["id"] in predictions and c["text"] and c["text"] != "(data file not found)" for c in cases)
    result = runner.invoke(app, ["explain", "--experiment", str(moved), "--n", "3"])
    assert result.exit_code == 0 and "aemt" in result.output and "text" in result.output
    assert "first seed" in result.output
    with pytest.raises(RunError, match=r"clip ids \['nope'\] are not among the 16 test clips"):
        explain(moved, ids=["nope"])


class _Spy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, features, masks):
        self.seen.append(({m: x.clone() for m, x in features.items()}, {m: k.clone() for m, k in masks.items()}))
        return AEMTOutput(features["text"].sum((1, 2)) * 0, torch.zeros(1))


def test_missing_modality_zeroes_exactly_the_requested_inputs():
    rng = np.random.default_rng(0)
    n, length = 5, 4
    split = Split("test", {m: rng.normal(size=(n, length, 3)).astype(np.float32) for m in ("text", "audio", "vision")},
                  {m: rng.integers(2, length + 1, n) for m in ("text", "audio", "vision")}, [str(i) for i in range(n)],
                  [""] * n)
    spy = _Spy()
    predict_split(spy, split, drop=("audio", "vision"))
    feats, masks = spy.seen[-1]
    assert torch.equal(feats["text"], torch.from_numpy(split.features["text"]))
    assert torch.equal(masks["text"].sum(1), torch.from_numpy(split.lengths["text"]))
    for m in ("audio", "vision"):
        assert (feats[m] == 0).all() and (masks[m].sum(1) == 1).all() and masks[m][:, 0].all()


def test_other_data_means_other_runs(tmp_path):
    path = _write(tmp_path, seeds=1, variants=["aemt"])
    cell = load_experiment(path).cells()[0]
    assert cell.finetune_key("a") != cell.finetune_key("b") and cell.pretrain_key("a") != cell.pretrain_key("b")


def test_parallel_jobs_train_the_same_runs_as_one_at_a_time(tmp_path):
    """--jobs 2: the runs go to worker processes and end as the in-process runs do: same run
    folders, same test metrics and predictions (one CPU thread everywhere, so the sums match)."""
    path = _write(tmp_path, seeds=1, variants=["mult", "aemt", "aemt-no-mcd"],
                  data={"synthetic": {"n_train": 40, "n_valid": 12, "n_test": 16, "n_unlabeled": 40}})
    exp = load_experiment(path, epochs=1)
    logs, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = run_experiment(exp, tmp_path / "serial", log=lambda m: None)
        parallel = run_experiment(exp, tmp_path / "parallel", log=logs.append, jobs=2)
    finally:
        torch.set_num_threads(threads)
    assert [Path(r["run_dir"]).name for r in parallel] == [Path(r["run_dir"]).name for r in serial]
    assert "2 pretrain runs, 2 at a time (CPU, 1 thread(s) each)" in logs
    assert "3 finetune runs, 2 at a time (CPU, 1 thread(s) each)" in logs
    assert sorted(m[:5] for m in logs if m.startswith("[")) == ["[1/2]", "[1/3]", "[2/2]", "[2/3]", "[3/3]"]
    for a, b in zip(serial, parallel):
        for metric in ("MAE", "Corr", "Mult_acc_2"):
            assert b[metric] == pytest.approx(a[metric], rel=1e-6), (a["label"], metric)
        pa, pb = (read_csv(root / r["run_dir"] / "predictions.csv") for r, root in ((a, tmp_path / "serial"),
                                                                                      (b, tmp_path / "parallel")))
        assert [float(x["prediction"]) for x in pb] == pytest.approx([float(x["prediction"]) for x in pa], abs=1e-6)


class _Crash(RunTask):
    def run(self) -> None:
        os._exit(3)


class _Bug(RunTask):
    def run(self) -> None:
        raise ValueError("a bug")


class _Marker(RunTask):
    """Sleeps ``float(label)`` seconds, then leaves a file at ``run_dir``."""

    def run(self) -> None:
        time.sleep(float(self.label))
        self.run_dir.write_text("ran")


def _tasks(tmp_path, *kinds_and_labels):
    cfg = load_config("synthetic", {"data.cache_dir": "off"})  # nothing to pool first
    return [kind("finetune", label, cfg, tmp_path / "l.pkl", tmp_path / f"run{i}")
            for i, (kind, label) in enumerate(kinds_and_labels)]


def test_a_worker_that_crashes_or_raises_is_reported_with_its_run(tmp_path):
    with pytest.raises(RuntimeError, match=r"finetune run '.*run0' \(x\) failed: its process ended "
                                           r"with exit code 3"):
        run_tasks(_tasks(tmp_path, (_Crash, "x"), (_Marker, "60")), 2, log=lambda m: None)
    assert not (tmp_path / "run1").exists()  # the crash stopped the other worker
    logs = []
    with pytest.raises(RuntimeError, match=r"failed: ValueError: a bug \(the worker's traceback is above\)"):
        run_tasks(_tasks(tmp_path, (_Bug, "x"), (_Marker, "4"), (_Marker, "0")), 2, log=logs.append)
    assert any("Traceback" in m and 'raise ValueError("a bug")' in m for m in logs)
    assert (tmp_path / "run1").read_text() == "ran"  # the run already started ended
    assert not (tmp_path / "run2").exists()  # no run starts after a failure
    assert not multiprocessing.active_children()


def test_ctrl_c_stops_the_workers(tmp_path):
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 8.0)  # after the workers have started
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_tasks(_tasks(tmp_path, (_Marker, "120"), (_Marker, "120")), 2, log=lambda m: None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < 40 and not multiprocessing.active_children()
    assert not list(tmp_path.glob("run*"))


def test_parallel_jobs_name_the_run_that_failed(tmp_path):
    """A bad file fails before any worker starts, with the loader's message; a run that fails in
    a worker (labels in [-3, 3] where the config's metrics admit [-1, 1]) is named."""
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    exp = load_experiment(_write(tmp_path, seeds=2, variants=["mult"], data={"labeled": str(bad)}))
    with pytest.raises(DataError, match="bad.pkl"):
        run_experiment(exp, tmp_path / "out", log=lambda m: None, jobs=2)
    mosei = {"synthetic": {"preset": "mosei", "n_train": 20, "n_valid": 8, "n_test": 8, "n_unlabeled": 8}}
    exp = load_experiment(_write(tmp_path, seeds=2, variants=["mult"], data=mosei))
    with pytest.raises(RunError, match=r"finetune run '.*mult-.*' \(mult, seed 111[12]\) failed: "
                                       r"DataError: .*expected labels in \[-1, 1\]"):
        run_experiment(exp, tmp_path / "out2", log=lambda m: None, jobs=2)


def test_a_run_that_diverges_in_a_serial_experiment_is_named(tmp_path):
    hot = {"finetune.pretrained": "none", "finetune.lr": 1e30, "trainer.grad_clip": 0.0}
    exp = load_experiment(_write(tmp_path, seeds=1, variants=[{"hot": hot}]))
    with pytest.raises(RunError, match=r"finetune run '.*hot-.*' \(hot, seed \d+\) failed: RunError: "
                                       r"finetune diverged"):
        run_experiment(exp, tmp_path / "out", log=lambda m: None, jobs=1)


def test_jobs_refuse_runs_on_several_devices(tmp_path):
    exp = load_experiment(_write(tmp_path, seeds=1, variants=["mult"], overrides={"trainer.devices": 2}))
    with pytest.raises(ConfigError, match="--jobs 2 trains each run on one device: expected trainer.devices 1"):
        run_experiment(exp, tmp_path / "out", log=lambda m: None, jobs=2)
    with pytest.raises(ConfigError, match="--jobs: expected at least 1, got 0"):
        run_experiment(exp, tmp_path / "out", log=lambda m: None, jobs=0)
    assert not (tmp_path / "out").exists()  # refused before any data or run was written


def test_missing_modality_table_signs_the_change():
    from aemt.evaluation.report import missing_modality_markdown

    rows = [{"label": "aemt", "seed": 1, "removed": removed, "F1_score": f1, "F1_score_drop": 0.5 - f1}
            for removed, f1 in (("none", 0.5), ("audio", 0.4), ("vision", 0.6))]
    line = missing_modality_markdown(rows).splitlines()[-1]
    assert line == "| aemt | 50.00 | 40.00 (-10.00) | 60.00 (+10.00) |"


# --- report formatting -----------------------------------------------------------------------

def _metric_rows(per_label: dict[str, list[float]]) -> list[dict]:
    """results.csv-like rows: one per (label, seed), SIMS metrics, Mult_acc_3 as given, MAE 0.5."""
    return [{"label": label, "seed": seed, "Mult_acc_2": 0.59, "Mult_acc_3": acc3, "Mult_acc_5": 0.2,
             "F1_score": 0.6, "MAE": 0.5, "Corr": 0.3}
            for label, values in per_label.items() for seed, acc3 in enumerate(values)]


def test_one_seed_shows_the_mean_without_a_std():
    from aemt.evaluation.report import summary_cells, summary_markdown

    summary = summarize(_metric_rows({"mult": [0.59], "aemt": [0.6]}))
    mean, std, n = summary["mult"]["Mult_acc_2"]
    assert (mean, std, n) == (pytest.approx(59.0), None, 1)  # a sample std over one seed is undefined
    assert summary_cells(summary)["mult"][0] == ("59.00", True)
    text = summary_markdown(summary, "Test metrics")
    assert "±" not in text and "| mult | 1 | **59.00** |" in text
    two = summary_cells(summarize(_metric_rows({"mult": [0.59, 0.61]})))["mult"][1]
    assert two == ("60.00 ± 1.41", True)


def test_every_row_that_ties_for_the_best_is_bold():
    from aemt.evaluation.report import summary_cells, summary_markdown

    # 35.9375 and 35.94 both show as 35.94; MAE (lower is better) ties for all three
    summary = summarize(_metric_rows({"mult": [0.359375], "aemt": [0.3594], "aemt-no-cl": [0.30]}))
    best = {label: cells[1][1] for label, cells in summary_cells(summary).items()}
    assert best == {"mult": True, "aemt": True, "aemt-no-cl": False}
    lines = summary_markdown(summary, "Test metrics").splitlines()
    assert sum("**35.94**" in line for line in lines) == 2 and sum("**50.00**" in line for line in lines) == 3


def _labeled_split(labels: np.ndarray) -> Split:
    n = labels.size
    return Split(name="test", features={m: np.zeros((n, 2, 3), np.float32) for m in ("text", "audio", "vision")},
                 lengths={m: np.ones(n, np.int64) for m in ("text", "audio", "vision")},
                 ids=[f"clip_{i}" for i in range(n)], raw_text=["a"] * n, labels={k: labels for k in "MTAV"})


def test_labels_and_predictions_are_written_without_float32_noise(tmp_path):
    from aemt.evaluation.predict import write_predictions
    from aemt.evaluation.report import case_study

    labels = np.array([-0.2, -0.0, 0.6, -1 / 3], np.float32)
    predictions = np.array([0.443, -0.0, -0.0004, 1.0], np.float32)
    path = tmp_path / "predictions.csv"
    write_predictions(path, _labeled_split(labels), predictions)
    lines = path.read_text().splitlines()
    assert lines[0] == "id,label,label_T,label_A,label_V,prediction"
    assert lines[1:] == ["clip_0,-0.2,-0.2,-0.2,-0.2,0.443", "clip_1,0,0,0,0,0",
                         "clip_2,0.6,0.6,0.6,0.6,-0.0004", "clip_3,-0.33333334,-0.33333334,-0.33333334,-0.33333334,1"]
    rows = read_csv(path)  # each number reads back as the same float32
    for key, values in (("label", labels), ("label_T", labels), ("prediction", predictions)):
        assert np.array([r[key] for r in rows], dtype=np.float32).tolist() == values.tolist()
    cases = case_study({"aemt": path}, ids=["clip_0", "clip_1", "clip_2"])
    assert [(c["label"], c["T"], c["aemt"]) for c in cases] == [("-0.2", "-0.2", "0.443"), ("0", "0", "0.000"),
                                                                ("0.6", "0.6", "0.000")]
    # a predictions.csv written before (float64 repr of the float32 values) reads the same
    old = tmp_path / "old.csv"
    old.write_text("id,label,label_T,label_A,label_V,prediction\n"
                   "clip_0,-0.20000000298023224,-0.0,0.6000000238418579,-0.3333333432674408,-0.00030000001424923539\n")
    case = case_study({"aemt": old}, ids=["clip_0"])[0]
    assert [case[k] for k in ("label", "T", "A", "V", "aemt")] == ["-0.2", "0", "0.6", "-0.33333334", "0.000"]


def test_the_two_tables_round_a_halfway_mean_alike():
    """The tester's case: F1 of 0.4242 and 0.4795 over two seeds, a mean of 45.185 (x100)."""
    from aemt.evaluation.report import missing_modality_markdown, summary_cells

    rows = [{**row, "F1_score": f1} for row, f1 in zip(_metric_rows({"aemt": [0.6, 0.6]}), (0.4242, 0.4795))]
    summary_f1 = summary_cells(summarize(rows))["aemt"][3][0].split(" ")[0]
    missing = [{"label": "aemt", "seed": r["seed"], "removed": "none", "F1_score": r["F1_score"], "F1_score_drop": 0.0}
               for r in rows]
    assert missing_modality_markdown(missing).splitlines()[-1] == f"| aemt | {summary_f1} |"


def test_a_pretraining_sweep_of_a_variant_without_pretraining_is_refused(tmp_path):
    path = _write(tmp_path, variants=["mult"], sweeps={"pretrain.lambda1": [0, 0.4]}, sweep_variant="mult")
    with pytest.raises(ConfigError, match=r"key 'sweeps': expected keys that change the sweep variant 'mult'; it does "
                                          r"not pre-train .*got \['pretrain.lambda1'\]"):
        load_experiment(path)
    assert load_experiment(_write(tmp_path, variants=["mult", "aemt"], sweeps={"pretrain.lambda1": [0, 0.4]},
                                  sweep_variant="aemt")).sweeps
