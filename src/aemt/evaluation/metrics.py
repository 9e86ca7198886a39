"""MMSA's regression metrics, with MMSA's keys, definitions and 4-decimal rounding.

SIMS / SIMS v2 (``kind="sims"``): values clipped to [-1, 1], binned by half-open intervals
(lo, hi] with edges -1.01, 0, 1.01 (2 classes), -1.01, -0.1, 0.1, 1.01 (3) and -1.01, -0.7, -0.1,
0.1, 0.7, 1.01 (5); weighted F1 of the 2-class bins; MAE and Pearson r of the clipped values.
MOSI / MOSEI (``kind="mosei"``): ``Has0`` = (x >= 0) over all clips, ``Non0`` = (x > 0) over
clips whose label is not 0; ``Mult_acc_7``/``_5``: rounded values after clipping to [-3, 3] /
[-2, 2]; MAE and Pearson r on the unclipped values. Results are fractions, as MMSA returns them.
Everything is computed on float32 values, as in MMSA (so its bin edges compare as float32 too).

``Corr`` (Pearson r) is undefined for fewer than 2 clips, or when the predictions or labels (after
SIMS clipping) are all equal: it is then NaN, as MMSA's ``np.corrcoef`` gives, with a
``RuntimeWarning`` that says why. Non-finite predictions or labels are refused (:class:`DataError`).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import f1_score

from aemt.errors import DataError

METRIC_KEYS = {
    "sims": ("Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr"),
    "mosei": ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5", "Mult_acc_7", "MAE", "Corr"),
}
LOWER_IS_BETTER = frozenset({"MAE"})
_SIMS_INNER_EDGES = {2: (0.0,), 3: (-0.1, 0.1), 5: (-0.7, -0.1, 0.1, 0.7)}


def _acc(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(pred == true))


def _pearson(pred: np.ndarray, true: np.ndarray) -> float:
    """Pearson r; NaN with a warning where it is undefined (MMSA's ``np.corrcoef`` gives NaN there too)."""
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(true) == 0:
        warnings.warn(f"Corr is NaN: Pearson r needs at least 2 clips whose predictions and labels vary; got "
                      f"{pred.size} clips, {np.unique(pred).size} distinct predictions, "
                      f"{np.unique(true).size} distinct labels", RuntimeWarning, stacklevel=4)
        return float("nan")
    return float(np.corrcoef(pred, true)[0, 1])


def sims_bins(values: np.ndarray, n_classes: int) -> np.ndarray:
    """Class index of each value for MMSA's SIMS binning into ``n_classes`` (2, 3 or 5)."""
    return np.searchsorted(np.asarray(_SIMS_INNER_EDGES[n_classes], dtype=values.dtype), values, side="left")


def sims_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MMSA ``__eval_sims_regression``."""
    pred, true = np.clip(pred, -1.0, 1.0), np.clip(true, -1.0, 1.0)
    out = {f"Mult_acc_{k}": _acc(sims_bins(pred, k), sims_bins(true, k)) for k in (2, 3, 5)}
    out["F1_score"] = float(f1_score(sims_bins(true, 2), sims_bins(pred, 2), average="weighted"))
    out["MAE"] = float(np.mean(np.abs(pred - true)))
    out["Corr"] = _pearson(pred, true)
    return out


def mosei_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MMSA ``__eval_mosei_regression``."""
    out: dict[str, float] = {}
    out["Has0_acc_2"] = _acc(pred >= 0, true >= 0)
    out["Has0_F1_score"] = float(f1_score(true >= 0, pred >= 0, average="weighted"))
    nz = true != 0
    out["Non0_acc_2"] = _acc(pred[nz] > 0, true[nz] > 0) if nz.any() else float("nan")
    out["Non0_F1_score"] = float(f1_score(true[nz] > 0, pred[nz] > 0, average="weighted")) if nz.any() else float("nan")
    for k, bound in ((5, 2.0), (7, 3.0)):
        out[f"Mult_acc_{k}"] = _acc(np.round(np.clip(pred, -bound, bound)), np.round(np.clip(true, -bound, bound)))
    out["MAE"] = float(np.mean(np.abs(pred - true)))
    out["Corr"] = _pearson(pred, true)
    return out


def compute_metrics(pred, true, kind: str) -> dict[str, float]:
    """MMSA metrics for ``kind`` ("sims" or "mosei"), each rounded to 4 decimals as MMSA does.

    Non-finite predictions or labels raise :class:`DataError`; ``Corr`` is NaN, with a
    ``RuntimeWarning``, where Pearson r is undefined (fewer than 2 clips, constant values)."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)  # float64 first: a value beyond float32's range
    true = np.asarray(true, dtype=np.float64).reshape(-1)  # is refused below as what it is, not as inf
    if pred.shape != true.shape or pred.size == 0:
        raise ValueError(f"expected non-empty predictions and labels of equal length, got {pred.size} and {true.size}")
    if kind not in METRIC_KEYS:
        raise ValueError(f"expected metrics 'sims' or 'mosei', got {kind!r}")
    for key, values in (("prediction", pred), ("label", true)):
        bad = int((~np.isfinite(values)).sum())
        if bad:
            raise DataError(f"expected finite values, got {bad} of {values.size} non-finite (NaN or inf)", key=key)
        huge = np.abs(values) > np.finfo(np.float32).max
        if huge.any():
            raise DataError(f"expected values within float32's range (MMSA's), got {values[huge][0]:g} "
                            f"({int(huge.sum())} of {values.size})", key=key)
    # float32, as MMSA computes them (its labels and outputs are float32 tensors): a float32 label of
    # 0.1 or -0.7 then sits on its bin edge, as in MMSA, where float64 would move it into the next bin
    pred, true = pred.astype(np.float32), true.astype(np.float32)
    values = sims_metrics(pred, true) if kind == "sims" else mosei_metrics(pred, true)
    return {key: round(values[key], 4) for key in METRIC_KEYS[kind]}
