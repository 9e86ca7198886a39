"""Reading and validating MMSA-layout feature files (see shared/mmsa-format.md).

``read_labeled`` and ``read_unlabeled`` return :class:`Split` objects: the padded feature
arrays as stored, valid lengths, labels M/T/A/V and ids, after every check below. Dims and
lengths always come from the file. Each violation raises one :class:`~aemt.errors.DataError`
naming file, split, key, expected and actual value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from aemt.data.safe_pickle import safe_load_pickle
from aemt.errors import DataError

MODALITIES = ("text", "audio", "vision")
LABEL_KEYS = {"M": "regression_labels", "T": "regression_labels_T", "A": "regression_labels_A",
              "V": "regression_labels_V"}
LABELED_SPLITS = ("train", "valid", "test")
LABEL_RANGES = {"sims": (-1.0, 1.0), "mosei": (-3.0, 3.0)}  # admitted label range per metric set


@dataclass
class Split:
    """One validated split (as read, or after pooling). ``features[m]`` is (N, L_m, D_m) float32 with
    padding after ``lengths[m]``; ``labels`` holds M/T/A/V (N,) float32 or is None (unlabeled)."""

    name: str
    features: dict[str, np.ndarray]
    lengths: dict[str, np.ndarray]
    ids: list[str]
    raw_text: list[str]
    labels: dict[str, np.ndarray] | None = None
    unimodal_from_multimodal: bool = False  # True when T/A/V were copied from M (MOSI/MOSEI)
    nonfinite: dict[str, int] = field(default_factory=dict)  # values replaced by 0, per modality

    @property
    def n(self) -> int:
        """Number of clips."""
        return len(self.ids)


def _err(msg: str, file: Path, split: str | None = None, key: str | None = None) -> DataError:
    return DataError(msg, file=str(file), split=split, key=key)


def _as_array(value: Any, file: Path, split: str, key: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise _err(f"cannot be read as an array ({exc})", file, split, key) from None


def _check_rank(arr: np.ndarray, rank: int, file: Path, split: str, key: str, what: str) -> None:
    if arr.ndim != rank:
        raise _err(f"expected rank {rank} ({what}), got shape {tuple(arr.shape)}", file, split, key)


def _check_n(n: int, actual: int, file: Path, split: str, key: str, ref_key: str) -> None:
    if actual != n:
        raise _err(f"expected {n} entries (as in '{ref_key}'), got {actual}", file, split, key)


def _float_features(arr: np.ndarray, file: Path, split: str, key: str) -> tuple[np.ndarray, int]:
    """Return float32 features with -inf/+inf/NaN replaced by 0, and how many were replaced."""
    if not np.issubdtype(arr.dtype, np.number):
        raise _err(f"expected numeric features, got dtype {arr.dtype}", file, split, key)
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    count = int(bad.sum())
    if count:
        if not arr.flags.writeable:
            arr = arr.copy()
        arr[bad] = 0.0
    return arr, count


def _text_lengths(part: Mapping[str, Any], text: np.ndarray, file: Path, split: str) -> np.ndarray:
    """Valid text tokens: the attention mask of ``text_bert`` when present, else up to the last
    non-zero token vector (MMSA text has no length key)."""
    if "text_bert" in part:
        bert = _as_array(part["text_bert"], file, split, "text_bert")
        if bert.ndim == 3 and bert.shape[0] == text.shape[0] and bert.shape[1] >= 2 \
                and bert.shape[2] == text.shape[1]:
            return np.clip(bert[:, 1, :].sum(axis=1).astype(np.int64), 1, text.shape[1])
    nonzero = np.abs(text).sum(axis=2) > 0
    last = text.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 1).astype(np.int64)


def _lengths(part: Mapping[str, Any], modality: str, feats: np.ndarray, file: Path, split: str) -> np.ndarray:
    n, padded = feats.shape[:2]
    key = f"{modality}_lengths"
    if modality == "text":
        return _text_lengths(part, feats, file, split)
    if key not in part:  # aligned files: every clip spans the padded length
        return np.full(n, padded, dtype=np.int64)
    lengths = _as_array(part[key], file, split, key)
    _check_rank(lengths, 1, file, split, key, "one length per clip")
    _check_n(n, lengths.shape[0], file, split, key, modality)
    if not np.issubdtype(lengths.dtype, np.number) or not np.all(np.isfinite(lengths)) \
            or not np.all(lengths == np.round(lengths)):
        raise _err(f"expected integer lengths, got dtype {lengths.dtype}", file, split, key)
    lengths = lengths.astype(np.int64)
    if lengths.min() < 1 or lengths.max() > padded:
        worst = int(lengths.argmin() if lengths.min() < 1 else lengths.argmax())
        raise _err(f"expected lengths in [1, {padded}] (the padded length of '{modality}'), "
                   f"got {int(lengths[worst])} at clip {worst}", file, split, key)
    return lengths


def _labels(part: Mapping[str, Any], n: int, file: Path, split: str,
            label_range: tuple[float, float]) -> tuple[dict[str, np.ndarray], bool]:
    lo, hi = label_range
    labels: dict[str, np.ndarray] = {}
    for name, key in LABEL_KEYS.items():
        if key not in part:
            if name == "M":
                raise _err("missing key (multimodal labels)", file, split, key)
            continue
        arr = _as_array(part[key], file, split, key)
        if arr.ndim == 2 and arr.shape[1] == 1:  # some exports store (N, 1)
            arr = arr[:, 0]
        _check_rank(arr, 1, file, split, key, "one label per clip")
        _check_n(n, arr.shape[0], file, split, key, "text")
        if not np.issubdtype(arr.dtype, np.number):
            raise _err(f"expected numeric labels, got dtype {arr.dtype}", file, split, key)
        arr = arr.astype(np.float32)
        if not np.all(np.isfinite(arr)) or arr.min() < lo or arr.max() > hi:
            bad = int(np.argmax(~np.isfinite(arr) | (arr < lo) | (arr > hi)))
            raise _err(f"expected labels in [{lo:g}, {hi:g}], got {float(arr[bad]):g} at clip {bad}", file, split, key)
        labels[name] = arr
    filled = not all(k in labels for k in "TAV")
    if filled:  # MOSI/MOSEI: the paper copies the multimodal label into T/A/V
        for name in "TAV":
            labels[name] = labels["M"].copy()
    return labels, filled


def check_label_range(split: Split, file: Path, label_range: tuple[float, float]) -> None:
    """Raise DataError if any M/T/A/V label of ``split`` lies outside ``label_range``."""
    lo, hi = label_range
    for name, arr in (split.labels or {}).items():
        bad = (arr < lo) | (arr > hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise _err(f"expected labels in [{lo:g}, {hi:g}], got {float(arr[i]):g} at clip {i}",
                       file, split.name, LABEL_KEYS[name])


def read_split(part: Any, file: Path, split: str, *, labeled: bool,
               label_range: tuple[float, float] = (-3.0, 3.0)) -> Split:
    """Validate one split dict of an MMSA file and return it as a :class:`Split`."""
    if not isinstance(part, Mapping):
        raise _err(f"expected a dict of arrays, got {type(part).__name__}", file, split)
    feats: dict[str, np.ndarray] = {}
    lengths: dict[str, np.ndarray] = {}
    nonfinite: dict[str, int] = {}
    n = None
    for m in MODALITIES:
        if m not in part:
            raise _err("missing key (expected features of shape (N, L, D))", file, split, m)
        arr = _as_array(part[m], file, split, m)
        _check_rank(arr, 3, file, split, m, "(N, L, D)")
        if n is None:
            n = arr.shape[0]
            if n == 0:
                raise _err("empty split: expected at least 1 clip, got 0", file, split, m)
        _check_n(n, arr.shape[0], file, split, m, "text")
        if arr.shape[1] < 1 or arr.shape[2] < 1:
            raise _err(f"expected non-empty (L, D), got shape {tuple(arr.shape)}", file, split, m)
        feats[m], nonfinite[m] = _float_features(arr, file, split, m)
        lengths[m] = _lengths(part, m, feats[m], file, split)
    assert n is not None
    ids = [str(i) for i in part["id"]] if "id" in part else [f"{split}_{i}" for i in range(n)]
    raw_text = [str(t) for t in part["raw_text"]] if "raw_text" in part else [""] * n
    _check_n(n, len(ids), file, split, "id", "text")
    _check_n(n, len(raw_text), file, split, "raw_text", "text")
    labels, filled = _labels(part, n, file, split, label_range) if labeled else (None, False)
    if sum(nonfinite.values()):
        detail = ", ".join(f"{m}: {c}" for m, c in nonfinite.items() if c)
        warnings.warn(f"{file} split '{split}': replaced non-finite feature values by 0 ({detail})",
                      stacklevel=2)
    return Split(split, feats, lengths, ids, raw_text, labels, filled, nonfinite)


def _check_dims(splits: Mapping[str, Split], file: Path) -> None:
    first = next(iter(splits.values()))
    for split in splits.values():
        for m in MODALITIES:
            want, got = first.features[m].shape[2], split.features[m].shape[2]
            if want != got:
                raise _err(f"expected feature dim {want} (as in split '{first.name}'), got {got}",
                           file, split.name, m)


def load_pickle_dict(path: Path) -> dict:
    """Safely unpickle ``path`` and check that it holds a dict of splits."""
    data = safe_load_pickle(path)
    if not isinstance(data, Mapping):
        raise _err(f"expected a dict of splits at top level, got {type(data).__name__}", path)
    return data


def read_labeled(path: str | Path, label_range: tuple[float, float] = (-3.0, 3.0),
                 data: dict | None = None) -> dict[str, Split]:
    """Read the ``train``/``valid``/``test`` splits of a labeled MMSA file (``data``: the file's
    already-unpickled content, to avoid reading it twice)."""
    path = Path(path)
    data = load_pickle_dict(path) if data is None else data
    for split in LABELED_SPLITS:
        if split not in data:
            raise _err(f"missing split; expected splits {list(LABELED_SPLITS)}, got {sorted(data)}", path, split)
    splits = {s: read_split(data.pop(s), path, s, labeled=True, label_range=label_range) for s in LABELED_SPLITS}
    _check_dims(splits, path)
    return splits


def read_unlabeled(path: str | Path, data: dict | None = None) -> dict[str, Split]:
    """Read unlabeled clips for pre-training, from either layout:

    * a separate file whose splits (any names, typically ``train`` and ``valid``) hold features;
      label keys, if any, are ignored;
    * a labeled file with a ``train_mix`` split and a ``mask`` (1 = labeled, 0 = unlabeled), as the
      CH-SIMS v2 AV-MC code reads it: the unlabeled rows become split ``train``.
    """
    path = Path(path)
    data = load_pickle_dict(path) if data is None else data
    if "train_mix" in data:
        part = data["train_mix"]
        if not isinstance(part, Mapping) or "mask" not in part:
            raise _err("missing key (1 = labeled, 0 = unlabeled)", path, "train_mix", "mask")
        mask = _as_array(part["mask"], path, "train_mix", "mask").reshape(-1)
        keep = np.flatnonzero(mask == 0)
        if keep.size == 0:
            raise _err("empty split: no unlabeled rows (mask == 0)", path, "train_mix", "mask")
        part = {k: (np.asarray(v)[keep] if k != "mask" and np.ndim(v) >= 1 and len(v) == mask.size else v)
                for k, v in part.items()}
        splits = {"train": read_split(part, path, "train", labeled=False)}
    else:
        names = [k for k, v in data.items() if isinstance(v, Mapping)]
        if all(s in names for s in LABELED_SPLITS):  # a labeled file: never pre-train on its test clips
            names = ["train", "valid"]
        if not names:
            raise _err(f"expected at least one split dict, got keys {sorted(map(str, data))}", path)
        splits = {s: read_split(data.pop(s), path, s, labeled=False) for s in names}
    _check_dims(splits, path)
    return splits
