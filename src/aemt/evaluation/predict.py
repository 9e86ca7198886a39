"""Using a trained run: predictions, MMSA metrics, prediction CSVs (``aemt predict|evaluate``).

A run directory is self-contained: ``config.yaml`` + ``run.json`` rebuild the model,
``preprocess.npz`` repeats the standardisation, ``model.pt`` holds the best weights.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from aemt.config import Config, load_config
from aemt.data.batches import ClipTensors, masks_from_lengths
from aemt.data.dataset import concat_splits, load_for_prediction, load_labeled, standardize_split
from aemt.data.mmsa import MODALITIES, Split
from aemt.errors import DataError, RunError
from aemt.evaluation.metrics import compute_metrics
from aemt.evaluation.report import float_text
from aemt.io_utils import atomic_write_text, json_text, nearest_existing
from aemt.models import AEMT
from aemt.models.compat import upgrade_state_dict
from aemt.training.run_files import load_weights, read_run_info, weight_mismatches


def load_run(run_dir: str | Path, device: str | None = None) -> tuple[AEMT, Config, dict, dict | None]:
    """Rebuild the fine-tuned model of ``run_dir`` with its best weights, in eval mode."""
    run_dir = Path(run_dir)
    info, stats = read_run_info(run_dir)
    if info["stage"] != "finetune":
        raise RunError(f"'{run_dir}' is not a fine-tuning run (stage={info['stage']!r})")
    weights = run_dir / "model.pt"
    if not weights.is_file():
        raise RunError(f"'{run_dir}' has no model.pt: the run did not finish (resume it with --resume)")
    cfg = load_config(run_dir / "config.yaml")
    for key in ("seq_len", "text_input"):
        if info[key] != getattr(cfg.data, key):
            raise RunError(f"'{run_dir}': run.json says {key} {info[key]!r}, config.yaml data.{key} "
                           f"{getattr(cfg.data, key)!r}; the run folder is damaged")
    if cfg.data.standardize != (stats is not None):
        raise RunError(f"'{run_dir / 'preprocess.npz'}' holds no standardisation statistics, but the run's "
                       "config.yaml has data.standardize: true" if stats is None else
                       f"'{run_dir / 'preprocess.npz'}' holds statistics, but config.yaml has data.standardize: false")
    model = AEMT(info["dims"], cfg.model)
    state = upgrade_state_dict(load_weights(weights), model.state_dict())
    problems = weight_mismatches(state, model.state_dict())
    if problems:
        raise RunError(f"'{weights}' does not hold the weights of this model: {problems}")
    model.load_state_dict(state)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), cfg, info, stats


@torch.no_grad()
def predict_split(model: AEMT, split: Split, batch_size: int = 256, drop: Sequence[str] = ()) -> np.ndarray:
    """Predictions (N,) for every clip of ``split``. ``drop``: modalities removed at test time —
    their features are zeroed and their length set to one (zero) frame."""
    model.eval()
    device = next(model.parameters()).device
    data = ClipTensors(split)
    out = []
    for lo in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in data.__getitems__(list(range(lo, min(lo + batch_size, len(data))))).items()}
        for m in drop:
            batch[m] = torch.zeros_like(batch[m])
            batch[f"{m}_len"] = torch.ones_like(batch[f"{m}_len"])
        out.append(model({m: batch[m] for m in MODALITIES}, masks_from_lengths(batch)).prediction.float().cpu())
    return torch.cat(out).numpy()


def write_predictions(path: Path, split: Split, predictions: np.ndarray,
                      split_of: Sequence[str] | None = None) -> None:
    """CSV with columns id, split (when ``split_of``, each clip's split, is given), label, label_T,
    label_A, label_V (when known), prediction. Each number is the shortest decimal that reads back
    as the same float32 (-0.2, not -0.20000000298023224; 0, never -0), so the file holds the run's
    exact values without float32 noise."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    label_cols = [("label", "M"), ("label_T", "T"), ("label_A", "A"), ("label_V", "V")] if split.labels else []
    split_col = ["split"] if split_of is not None else []
    writer.writerow(["id", *split_col, *(c for c, _ in label_cols), "prediction"])
    for i, clip in enumerate(split.ids):
        writer.writerow([clip, *([split_of[i]] if split_col else []),
                         *(float_text(split.labels[k][i]) for _, k in label_cols), float_text(predictions[i])])
    atomic_write_text(Path(path), buffer.getvalue())


def write_test_metrics(path: Path, split: Split, predictions: np.ndarray, kind: str) -> dict[str, float]:
    """Compute MMSA metrics of ``predictions`` against the split's M labels and save them as JSON
    (an undefined ``Corr``, NaN, as ``null``)."""
    metrics = compute_metrics(predictions, split.labels["M"], kind)
    atomic_write_text(Path(path), json_text(metrics, indent=2))
    return metrics


def _pooling(cfg: Config, info: dict) -> dict:
    """The loaders' pooling settings of a run: as its data was read."""
    return dict(seq_len=info["seq_len"], text_input=info["text_input"], metrics=cfg.data.metrics,
                cache_dir=cfg.data.cache_dir)


def _as_the_run_read(part: Split, info: dict, stats: dict | None, path: Path) -> Split:
    """``part`` standardised as the run's data was, after checking its feature widths against the run's."""
    for m in MODALITIES:
        if part.features[m].shape[2] != info["dims"][m]:
            raise DataError(f"expected feature width {info['dims'][m]} (the run's, as its run.json 'dims' says), "
                            f"got {part.features[m].shape[2]}", file=str(path), split=part.name, key=m)
    return part if stats is None else standardize_split(part, stats)


def _read_for_run(cfg: Config, info: dict, stats: dict | None, data_path: str | Path, split: str) -> Split:
    """Split ``split`` of the labeled file ``data_path``, pooled and standardised as the run's data
    was, after checking its feature widths."""
    path = Path(data_path)
    part = load_labeled(path, standardize_features=False, **_pooling(cfg, info))[split]
    return _as_the_run_read(part, info, stats, path)


def _read_for_prediction(cfg: Config, info: dict, stats: dict | None, data_path: str | Path,
                         split: str | None) -> tuple[Split, list[str] | None]:
    """The clips to predict of any file, pooled and standardised as the run's data was, after
    checking their feature widths, and each clip's split (None for a labeled file). ``split``: that
    split of the file, labeled or not; ``None``: ``test`` of a labeled file, every clip of any
    other, in file order."""
    path = Path(data_path)
    data = load_for_prediction(path, **_pooling(cfg, info))
    if split is not None and split not in data.splits:
        raise DataError(f"no such split; the file's splits are {list(data.splits)}", file=str(path), split=split)
    labeled = any(s.labels is not None for s in data.splits.values())
    chosen = [data[split or "test"]] if labeled or split else list(data.splits.values())
    part = chosen[0] if len(chosen) == 1 else concat_splits(chosen, "all")
    split_of = None if labeled else [s.name for s in chosen for _ in range(s.n)]
    return _as_the_run_read(part, info, stats, path), split_of


def checked_predictions(model: AEMT, part: Split, run_dir: Path, drop: Sequence[str] = (),
                        batch_size: int = 256) -> np.ndarray:
    """:func:`predict_split`, refusing non-finite predictions (NaN or inf weights, say) with a
    :class:`RunError` naming the run's ``model.pt``."""
    predictions = predict_split(model, part, batch_size, drop)
    bad = int((~np.isfinite(predictions)).sum())
    if bad:
        raise RunError(f"'{run_dir / 'model.pt'}' gives non-finite predictions (NaN or inf) for {bad} of "
                       f"{predictions.size} clips of split '{part.name}'; its weights are unusable (if training diverged, a "
                       "lower learning rate may help)")
    return predictions


def evaluate(run_dir: str | Path, data_path: str | Path, split: str = "test",
             drop: Sequence[str] = ()) -> dict[str, float]:
    """MMSA metrics of a trained run on one split of a labeled file (``drop``: modalities removed)."""
    return evaluate_drops(run_dir, data_path, [tuple(drop)], split)[tuple(drop)]


def evaluate_drops(run_dir: str | Path, data_path: str | Path, drop_sets: Sequence[tuple[str, ...]],
                   split: str = "test") -> dict[tuple[str, ...], dict[str, float]]:
    """MMSA metrics with each set of modalities removed at test time (model and data loaded once);
    an unknown modality, or removing all of them, is refused."""
    for drop in drop_sets:
        unknown = set(drop) - set(MODALITIES)
        if unknown:
            raise RunError(f"cannot remove {sorted(unknown)}: modalities are {list(MODALITIES)}")
        if set(drop) == set(MODALITIES):
            raise RunError(f"cannot remove every modality ({', '.join(MODALITIES)}): the model would have no "
                           "input at all; keep at least one")
    model, cfg, info, stats = load_run(run_dir)
    part = _read_for_run(cfg, info, stats, data_path, split)
    return {tuple(drop): compute_metrics(checked_predictions(model, part, Path(run_dir), drop), part.labels["M"],
                                         cfg.data.metrics)
            for drop in drop_sets}


def _check_writable(path: Path) -> None:
    """Refuse an output path that is an existing folder or lies under a file, before any work."""
    if path.is_dir():
        raise DataError("expected a path for the predictions CSV, got an existing folder", file=str(path))
    parent = nearest_existing(path.parent)
    if not parent.is_dir():
        raise DataError(f"cannot write the predictions CSV under '{parent}': it is a file, not a folder",
                        file=str(path))


def predict(run_dir: str | Path, data_path: str | Path, out_csv: str | Path, split: str | None = None) -> int:
    """Write per-clip predictions of a trained run for a file; return the number of rows.

    ``split`` picks any split of the file, labeled or not (an unknown name is refused, naming the
    file's splits); without it, a labeled file gives its ``test`` split and a file without labels
    every clip it holds, in file order. The CSV of a file without labels has a ``split`` column
    (each clip's split); that of a labeled file has the labels instead."""
    out_csv = Path(out_csv)
    _check_writable(out_csv)
    model, cfg, info, stats = load_run(run_dir)
    part, split_of = _read_for_prediction(cfg, info, stats, data_path, split)
    write_predictions(out_csv, part, checked_predictions(model, part, Path(run_dir)), split_of)
    return part.n
