"""``aemt data synth``, ``aemt data inspect`` and ``aemt score``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from aemt.cli.app import app
from aemt.errors import DataError
from aemt.io_utils import json_text, nearest_existing, require_file

data_app = typer.Typer(no_args_is_help=True, help="Make and inspect MMSA-layout feature files.")
app.add_typer(data_app, name="data")
console = Console()


@data_app.command("synth")
def synth(
    out_dir: Path = typer.Argument(..., help="Folder for labeled.pkl and unlabeled.pkl."),
    preset: str = typer.Option("sims2", help="sims2 (labels in [-1, 1], T/A/V labels) or mosei."),
    scale: str = typer.Option("small", help="small (fast demo shapes) or full (the real data set's shapes)."),
    n_train: Optional[int] = typer.Option(None, help="Labeled training clips."),
    n_valid: Optional[int] = typer.Option(None, help="Labeled validation clips."),
    n_test: Optional[int] = typer.Option(None, help="Labeled test clips."),
    n_unlabeled: Optional[int] = typer.Option(None, help="Unlabeled clips for pre-training."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Write a synthetic data set in the MMSA layout (see aemt.data.synthetic)."""
    from aemt.data.synthetic import synthetic_counts, write_synthetic

    counts = {"train": n_train, "valid": n_valid, "test": n_test, "unlabeled": n_unlabeled}
    synthetic_counts(preset, scale, counts, seed, name=_option_name)  # errors name the options, not the parameters
    _check_out_dir(out_dir)
    labeled, unlabeled = write_synthetic(out_dir, preset=preset, scale=scale, n_train=n_train, n_valid=n_valid,
                                         n_test=n_test, n_unlabeled=n_unlabeled, seed=seed)
    console.print(f"wrote {labeled} and {unlabeled}")


def _option_name(parameter: str) -> str:
    """The CLI option of a Python parameter: ``n_train`` -> ``--n-train``."""
    return "--" + parameter.replace("_", "-")


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an output folder that is, or lies under, an existing file (before generating any data)."""
    path = nearest_existing(out_dir)
    if not path.is_dir():
        raise DataError(f"expected a folder for labeled.pkl and unlabeled.pkl, but '{path}' is an existing "
                        "file; pass a folder path", file=str(out_dir))


@data_app.command("inspect")
def inspect(
    file: Path = typer.Argument(..., help="An MMSA-layout pickle (labeled or unlabeled)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Splits, shapes, valid-length statistics, label histograms and non-finite counts."""
    from aemt.evaluation.inspect import inspect_file

    report = inspect_file(file)
    if as_json:
        typer.echo(json_text(report, indent=2))
        return
    table = Table(title=f"{file} ({report['kind']})")
    for col in ("split", "clips", "modality", "shape (L x D)", "valid length min/mean/max", "non-finite"):
        table.add_column(col)
    for split, info in report["splits"].items():
        for i, (m, mod) in enumerate(info["modalities"].items()):
            lens = mod["lengths"]
            table.add_row(split if i == 0 else "", str(info["clips"]) if i == 0 else "", m,
                          f"{mod['shape'][0]}x{mod['shape'][1]}",
                          f"{lens['min']} / {lens['mean']:.1f} / {lens['max']}", str(mod["nonfinite"]))
    console.print(table)
    for split, info in report["splits"].items():
        for name, hist in info.get("label_histograms", {}).items():
            bins = "  ".join(f"{k}: {v}" for k, v in hist.items())
            console.print(f"[bold]{split}[/] label {name}: {bins}")
    filled = report.get("unimodal_from_multimodal_splits", [])
    if filled:
        console.print(f"unimodal labels T/A/V absent in split(s) {', '.join(filled)}: filled from the multimodal "
                      "label (as for MOSI/MOSEI)")
    more = report.get("pretraining_only_splits", [])
    if more:
        console.print(f"extra splits, read by pre-training only (with train and valid; never by finetune or "
                      f"evaluate): {_clips(report, more)}")
    left = report.get("left_out_of_pretraining_splits", [])
    if left:
        console.print(f"left out of pre-training: {_clips(report, left)}")
    if "train_mix" in report["splits"]:
        mix = report["splits"]["train_mix"]
        console.print(f"train_mix: {mix['unlabeled_clips']} of {mix['clips']} clips unlabeled (mask 0), "
                      "the clips pre-training reads from this file")
    for warning in report["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")


def _clips(report: dict, names: list[str]) -> str:
    """``name (N clips)`` for each of the splits ``names`` of an inspect report."""
    return ", ".join(f"{name} ({report['splits'][name]['clips']} clips)" for name in names)


def read_predictions_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the ``prediction`` and ``label`` columns of a CSV, with clear errors."""
    require_file(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: a spreadsheet's BOM is dropped
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for key in ("prediction", "label"):
            if columns.count(key) > 1:
                raise DataError(f"column {key!r} appears {columns.count(key)} times in {columns}; expected once",
                                file=str(path), key=key)
            if key not in columns:
                raise DataError(f"missing column; expected columns 'prediction' and 'label', got {columns}",
                                file=str(path), key=key)
        rows = list(reader)
    if not rows:
        raise DataError("no rows; expected at least one prediction", file=str(path))
    out = []
    for key in ("prediction", "label"):
        values = []
        for i, row in enumerate(rows):
            try:
                value = float(row[key])
            except (TypeError, ValueError):
                value = float("nan")
            if not np.isfinite(value):
                raise DataError(f"expected a finite number at row {i + 1}, got {row[key]!r}", file=str(path), key=key)
            values.append(value)
        out.append(np.asarray(values))
    return out[0], out[1]


@app.command("score")
def score(
    predictions: Path = typer.Argument(..., help="CSV with columns 'prediction' and 'label'."),
    metrics: str = typer.Option(..., help="sims (SIMS, SIMS v2) or mosei (MOSI, MOSEI)."),
    as_json: bool = typer.Option(False, "--json", help="Print MMSA's keys and values as JSON."),
) -> None:
    """Score any model's predictions with MMSA's metrics."""
    from aemt.data.mmsa import LABEL_RANGES
    from aemt.evaluation.metrics import compute_metrics

    if metrics not in ("sims", "mosei"):
        raise DataError(f"--metrics: expected 'sims' or 'mosei', got {metrics!r}")
    try:
        pred, label = read_predictions_csv(predictions)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"not a readable CSV text file ({exc})", file=str(predictions)) from None
    lo, hi = LABEL_RANGES[metrics]
    outside = np.flatnonzero((label < lo) | (label > hi))
    if outside.size:  # MMSA would clip them silently
        i = int(outside[0])
        raise DataError(f"expected labels in [{lo:g}, {hi:g}] for --metrics {metrics}, got {label[i]:g} at row {i + 1} "
                        f"({outside.size} of {label.size} labels outside)", file=str(predictions), key="label")
    result = compute_metrics(pred, label, metrics)
    if as_json:
        typer.echo(json_text(result))
        return
    print_metrics_table({str(predictions.name): result})


def print_metrics_table(rows: dict[str, dict[str, float]], scale: float = 100.0, title: str = "MMSA metrics (x100)") -> None:
    """Print one column per model and one row per metric, ×100 as MMSA and the paper print them."""
    keys = list(next(iter(rows.values())))
    table = Table(title=title)
    table.add_column("metric")
    for name in rows:
        table.add_column(name, justify="right")
    for key in keys:
        table.add_row(key, *(f"{values[key] * scale:.2f}" for values in rows.values()))
    console.print(table)
