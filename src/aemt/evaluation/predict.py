"""Using a trained run: predictions, MMSA metrics, prediction CSVs (``aemt predict|evaluate``).

A run directory is self-contained: ``config.yaml`` + ``run.json`` rebuild the model,
``preprocess.npz`` repeats the standardisation, ``model.pt`` holds the best weights.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from aemt.config import Config, load_config
from aemt.data.batches import ClipTensors, masks_from_lengths
from aemt.data.dataset import MSAData, load_labeled, load_unlabeled
from aemt.data.mmsa import MODALITIES, Split
from aemt.errors import RunError
from aemt.evaluation.metrics import compute_metrics
from aemt.io_utils import atomic_write_text
from aemt.models import AEMT
from aemt.models.compat import upgrade_state_dict
from aemt.training.common import load_weights, read_run_info


def load_run(run_dir: str | Path, device: str | None = None) -> tuple[AEMT, Config, dict, dict | None]:
    """Rebuild the fine-tuned model of ``run_dir`` with its best weights, in eval mode."""
    run_dir = Path(run_dir)
    info, stats = read_run_info(run_dir)
    if info.get("stage") != "finetune":
        raise RunError(f"'{run_dir}' is not a fine-tuning run (stage={info.get('stage')!r})")
    if not (run_dir / "model.pt").is_file():
        raise RunError(f"'{run_dir}' has no model.pt: the run did not finish (resume it with --resume)")
    cfg = load_config(run_dir / "config.yaml")
    model = AEMT(info["dims"], cfg.model)
    model.load_state_dict(upgrade_state_dict(load_weights(run_dir / "model.pt"), model.state_dict()))
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


def write_predictions(path: Path, split: Split, predictions: np.ndarray) -> None:
    """CSV with columns id, label, label_T, label_A, label_V (when known), prediction."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    label_cols = [("label", "M"), ("label_T", "T"), ("label_A", "A"), ("label_V", "V")] if split.labels else []
    writer.writerow(["id", *(c for c, _ in label_cols), "prediction"])
    for i, clip in enumerate(split.ids):
        writer.writerow([clip, *(f"{float(split.labels[k][i]):.4f}" for _, k in label_cols), f"{float(predictions[i]):.6f}"])
    atomic_write_text(Path(path), buffer.getvalue())


def write_test_metrics(path: Path, split: Split, predictions: np.ndarray, kind: str) -> dict[str, float]:
    """Compute MMSA metrics of ``predictions`` against the split's M labels and save them as JSON."""
    metrics = compute_metrics(predictions, split.labels["M"], kind)
    atomic_write_text(Path(path), json.dumps(metrics, indent=2))
    return metrics


def _load_for_run(run_dir: Path, data_path: str | Path, labeled: bool) -> tuple[AEMT, Config, MSAData]:
    model, cfg, info, stats = load_run(run_dir)
    d = cfg.data
    kw = dict(seq_len=info["seq_len"], text_input=info["text_input"], standardize_features=stats is not None,
              stats=stats, cache_dir=d.cache_dir)
    data = load_labeled(data_path, metrics=d.metrics, **kw) if labeled else load_unlabeled(data_path, valid_fraction=0.0, **kw)
    if data.dims != info["dims"]:
        raise RunError(f"'{data_path}': feature dims {data.dims} differ from the run's {info['dims']}")
    return model, cfg, data


def evaluate(run_dir: str | Path, data_path: str | Path, split: str = "test",
             drop: Sequence[str] = ()) -> dict[str, float]:
    """MMSA metrics of a trained run on one split of a labeled file (``drop``: modalities removed)."""
    return evaluate_drops(run_dir, data_path, [tuple(drop)], split)[tuple(drop)]


def evaluate_drops(run_dir: str | Path, data_path: str | Path, drop_sets: Sequence[tuple[str, ...]],
                   split: str = "test") -> dict[tuple[str, ...], dict[str, float]]:
    """MMSA metrics with each set of modalities removed at test time (model and data loaded once)."""
    for drop in drop_sets:
        unknown = set(drop) - set(MODALITIES)
        if unknown:
            raise RunError(f"cannot remove {sorted(unknown)}: modalities are {list(MODALITIES)}")
    model, cfg, data = _load_for_run(Path(run_dir), data_path, labeled=True)
    part = data[split]
    return {tuple(drop): compute_metrics(predict_split(model, part, drop=drop), part.labels["M"], cfg.data.metrics)
            for drop in drop_sets}


def predict(run_dir: str | Path, data_path: str | Path, out_csv: str | Path, split: str | None = None) -> int:
    """Write per-clip predictions of a trained run for a file; return the number of rows.

    A labeled file gives one split (``split``, default ``test``) with labels; a file without
    labels gives every clip it holds."""
    from aemt.errors import DataError

    try:
        model, _, data = _load_for_run(Path(run_dir), data_path, labeled=True)
        part = data[split or "test"]
    except DataError as exc:  # only a file without labels (or without train/valid/test) falls back
        unlabeled = "missing split" in str(exc) or (exc.key == "regression_labels" and "missing key" in str(exc))
        if split and unlabeled:
            raise DataError(f"--split {split!r} picks a split of a labeled file, and this file is not one ({exc}); "
                            "omit --split to predict every clip it holds") from None
        if not unlabeled:
            raise
        model, _, data = _load_for_run(Path(run_dir), data_path, labeled=False)
        part = data["all"]
    write_predictions(Path(out_csv), part, predict_split(model, part))
    return part.n
