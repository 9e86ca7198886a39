"""Reading and validating MMSA-layout feature files (see shared/mmsa-format.md).

``read_labeled`` and ``read_unlabeled`` return :class:`Split` objects: the padded feature
arrays as stored, valid lengths, labels M/T/A/V and ids, after every check below. Dims and
lengths always come from the file. Each violation raises one :class:`~aemt.errors.DataError`
naming file, split, key, expected and actual value.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from aemt.data.checks import as_array, check_n, check_rank, check_real, column, err, first_bad, float_features, shown
from aemt.data.safe_pickle import safe_load_pickle

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


def _text_lengths(part: Mapping[str, Any], text: np.ndarray, file: Path, split: str) -> np.ndarray:
    """Valid text tokens: the attention mask of ``text_bert`` when present (checked to be
    (N, >= 2, L) for ``text`` of shape (N, L, D)), else up to the last non-zero token vector (MMSA
    text has no length key)."""
    if "text_bert" in part:
        key = "text_bert"
        bert = as_array(part[key], file, split, key)
        check_real(bert, file, split, key, "token ids, attention mask, segment ids")
        check_rank(bert, 3, file, split, key, "(N, 3, L): token ids, attention mask, segment ids")
        check_n(text.shape[0], bert.shape[0], file, split, key, "text")
        if bert.shape[1] < 2:
            raise err(f"expected at least 2 rows (token ids, attention mask) in shape (N, 3, L), "
                      f"got shape {tuple(bert.shape)}", file, split, key)
        if bert.shape[2] != text.shape[1]:
            raise err(f"expected {text.shape[1]} tokens per row (the padded length of 'text'), "
                      f"got {bert.shape[2]}", file, split, key)
        mask = bert[:, 1, :]
        bad = ~np.isin(mask, (0, 1))
        if bad.any():
            clip, token = first_bad(bad)
            raise err(f"expected attention-mask values 0 or 1 (row 1), got {shown(mask[clip, token])} "
                      f"at clip {clip}, token {token} ({int(bad.sum())} bad values)", file, split, key)
        return np.clip(mask.sum(axis=1).astype(np.int64), 1, text.shape[1])
    nonzero = np.abs(text).sum(axis=2) > 0
    last = text.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 1).astype(np.int64)


def _lengths(part: Mapping[str, Any], modality: str, feats: np.ndarray, file: Path, split: str) -> np.ndarray:
    n, padded = feats.shape[:2]
    key = f"{modality}_lengths"
    if modality == "text":
        return _text_lengths(part, feats, file, split)
    if key not in part:  # aligned files: every clip spans the padded length
        other = next((f"{m}_lengths" for m in MODALITIES[1:] if f"{m}_lengths" in part), None)
        if other:  # an unaligned file that lost a key: its padding would be pooled as frames
            warnings.warn(f"file '{file}', split '{split}': missing key '{key}' while '{other}' is present; "
                          f"every clip's {modality} counts as {padded} valid frames (the padded length)",
                          stacklevel=4)
        return np.full(n, padded, dtype=np.int64)
    lengths = as_array(part[key], file, split, key)
    check_rank(lengths, 1, file, split, key, "one length per clip")
    check_n(n, lengths.shape[0], file, split, key, modality)
    check_real(lengths, file, split, key, "valid frames per clip")
    as_float = lengths.astype(np.float64)
    bad = ~np.isfinite(as_float) | (as_float != np.round(as_float)) | (as_float < 1) | (as_float > padded)
    if bad.any():
        worst = first_bad(bad)[0]
        raise err(f"expected integer lengths in [1, {padded}] (the padded length of '{modality}'), "
                  f"got {shown(lengths[worst])} at clip {worst}", file, split, key)
    return lengths.astype(np.int64)


def _labels(part: Mapping[str, Any], n: int, file: Path, split: str,
            label_range: tuple[float, float]) -> tuple[dict[str, np.ndarray], bool]:
    lo, hi = label_range
    labels: dict[str, np.ndarray] = {}
    unimodal = [LABEL_KEYS[name] for name in "TAV"]
    missing = [key for key in unimodal if key not in part]
    if 0 < len(missing) < len(unimodal):  # one lost key must not turn the other two into copies of M
        present = [key for key in unimodal if key in part]
        raise err(f"missing key(s) {', '.join(missing)}: expected all three unimodal labels "
                  f"regression_labels_T/A/V or none (then copied from the multimodal label), "
                  f"got only {', '.join(present)}", file, split, missing[0])
    for name, key in LABEL_KEYS.items():
        if key not in part:
            if name == "M":
                raise err("missing key (multimodal labels)", file, split, key)
            continue
        arr = column(as_array(part[key], file, split, key))
        check_rank(arr, 1, file, split, key, "one label per clip")
        check_n(n, arr.shape[0], file, split, key, "text")
        check_real(arr, file, split, key, "labels", allow_bool=False)
        arr = arr.astype(np.float32)
        if not np.all(np.isfinite(arr)) or arr.min() < lo or arr.max() > hi:
            bad = int(np.argmax(~np.isfinite(arr) | (arr < lo) | (arr > hi)))
            raise err(f"expected labels in [{lo:g}, {hi:g}], got {float(arr[bad]):g} at clip {bad}", file, split, key)
        labels[name] = arr
    filled = bool(missing)
    if filled:  # MOSI/MOSEI: the paper copies the multimodal label into T/A/V
        for name in "TAV":
            labels[name] = labels["M"].copy()
    return labels, filled


def check_label_range(split: Split, file: Path, label_range: tuple[float, float]) -> None:
    """Raise DataError if any M/T/A/V label of ``split`` lies outside ``label_range``."""
    lo, hi = label_range
    labels = split.labels or {}
    for name in [k for k in LABEL_KEYS if k in labels]:  # M first (T/A/V may be its copies), also from the cache
        arr = labels[name]
        bad = (arr < lo) | (arr > hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise err(f"expected labels in [{lo:g}, {hi:g}], got {float(arr[i]):g} at clip {i}",
                      file, split.name, LABEL_KEYS[name])


def _transcripts(part: Mapping[str, Any], n: int, file: Path, split: str) -> list[str]:
    """``raw_text`` as ``n`` strings; a clip without a transcript (None or NaN) gets "" and a warning:
    the texts are only shown (case studies), never trained on."""
    value = part["raw_text"]
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        missing = [i for i, t in enumerate(value) if t is None or (isinstance(t, float) and t != t)]
        if missing:
            warnings.warn(f"file '{file}', split '{split}', key 'raw_text': {len(missing)} clips without a transcript "
                          f"(None or NaN, first at clip {missing[0]}); shown as empty text", stacklevel=3)
            absent = set(missing)
            value = ["" if i in absent else t for i, t in enumerate(value)]
    return _strings({"raw_text": value}, "raw_text", n, file, split)


def _strings(part: Mapping[str, Any], key: str, n: int, file: Path, split: str) -> list[str]:
    """``part[key]`` (clip ids or transcripts) as ``n`` strings; ids may also be integers."""
    value = part[key]
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        got = f"array of shape {value.shape}" if isinstance(value, np.ndarray) else f"{value!r:.40} ({type(value).__name__})"
        raise err(f"expected a sequence of {n} strings (one per clip), got {got}", file, split, key)
    check_n(n, len(value), file, split, key, "text")
    for i, item in enumerate(value):
        if not isinstance(item, (str, bytes, int, np.integer)):
            raise err(f"expected a sequence of {n} strings (one per clip), got {item!r:.40} "
                      f"({type(item).__name__}) at clip {i}", file, split, key)
    return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in value]


def _feature_array(part: Mapping[str, Any], m: str, file: Path, split: str) -> np.ndarray:
    if m not in part:
        raise err("missing key (expected features of shape (N, L, D))", file, split, m)
    arr = as_array(part[m], file, split, m)
    check_rank(arr, 3, file, split, m, "(N, L, D)")
    return arr


def read_split(part: Any, file: Path, split: str, *, labeled: bool,
               label_range: tuple[float, float] = (-3.0, 3.0)) -> Split:
    """Validate one split dict of an MMSA file and return it as a :class:`Split`."""
    if not isinstance(part, Mapping):
        raise err(f"expected a dict of arrays, got {type(part).__name__}", file, split)
    feats: dict[str, np.ndarray] = {}
    lengths: dict[str, np.ndarray] = {}
    nonfinite: dict[str, int] = {}
    n = None
    for m in MODALITIES:
        arr = _feature_array(part, m, file, split)
        if n is None:
            n = arr.shape[0]
            if n == 0:
                raise err("empty split: expected at least 1 clip, got 0", file, split, m)
        check_n(n, arr.shape[0], file, split, m, "text")
        if arr.shape[1] < 1 or arr.shape[2] < 1:
            raise err(f"expected non-empty (L, D), got shape {tuple(arr.shape)}", file, split, m)
        feats[m], nonfinite[m] = float_features(arr, file, split, m)
        lengths[m] = _lengths(part, m, feats[m], file, split)
    assert n is not None
    ids = _strings(part, "id", n, file, split) if "id" in part else [f"{split}_{i}" for i in range(n)]
    _warn_duplicate_ids(ids, file, split)
    raw_text = _transcripts(part, n, file, split) if "raw_text" in part else [""] * n
    labels, filled = _labels(part, n, file, split, label_range) if labeled else (None, False)
    split_ = Split(split, feats, lengths, ids, raw_text, labels, filled, nonfinite)
    warn_nonfinite(split_, file)
    return split_


def _warn_duplicate_ids(ids: list[str], file: Path, split: str) -> None:
    """Warn of clip ids that repeat in a split (predictions and ``aemt explain --id`` name clips by id)."""
    repeats = len(ids) - len(set(ids))
    if repeats:
        first: dict[str, int] = {}
        i, clip = next((i, clip) for i, clip in enumerate(ids) if first.setdefault(clip, i) != i)
        warnings.warn(f"file '{file}', split '{split}', key 'id': clip id {clip!r} appears at clips {first[clip]} "
                      f"and {i} ({repeats} repeated ids); predictions name clips by id", stacklevel=4)


def warn_nonfinite(split: Split, file: Path) -> None:
    """Warn that ``split`` had non-finite feature values, replaced by 0."""
    if sum(split.nonfinite.values()):
        detail = ", ".join(f"{m}: {c}" for m, c in split.nonfinite.items() if c)
        warnings.warn(f"file '{file}', split '{split.name}': replaced non-finite feature values by 0 ({detail})",
                      stacklevel=3)


def check_same_dims(splits: Mapping[str, Split], file: Path) -> None:
    """Refuse splits whose feature widths differ (naming the first split that differs)."""
    first = next(iter(splits.values()))
    for split in splits.values():
        for m in MODALITIES:
            want, got = first.features[m].shape[2], split.features[m].shape[2]
            if want != got:
                raise err(f"expected feature dim {want} (as in split '{first.name}'), got {got}",
                          file, split.name, m)


def load_pickle_dict(path: Path) -> dict:
    """Safely unpickle ``path`` and check that it holds a dict of splits."""
    data = safe_load_pickle(path)
    if not isinstance(data, Mapping):
        raise err(f"expected a dict of splits at top level, got {type(data).__name__}", path)
    return data


def _split_names(data: Mapping) -> str:
    """The file's top-level keys as written (so a key ``0`` does not read as ``'0'``)."""
    return "[" + ", ".join(repr(k) for k in data) + "]"


def read_labeled(path: str | Path, label_range: tuple[float, float] = (-3.0, 3.0),
                 data: dict | None = None) -> dict[str, Split]:
    """Read the ``train``/``valid``/``test`` splits of a labeled MMSA file (``data``: the file's
    already-unpickled content, to avoid reading it twice)."""
    path = Path(path)
    data = load_pickle_dict(path) if data is None else data
    for split in LABELED_SPLITS:
        if split not in data:
            hint = " (split names must be strings)" if any(not isinstance(k, str) for k in data) else ""
            raise err(f"missing split; expected splits {list(LABELED_SPLITS)}, got {_split_names(data)}{hint}",
                      path, split)
    splits = {s: read_split(data.pop(s), path, s, labeled=True, label_range=label_range) for s in LABELED_SPLITS}
    check_same_dims(splits, path)
    note = unimodal_fallback_note(splits)
    if note:
        warnings.warn(f"file '{path}': {note}", stacklevel=2)
    return splits


def unimodal_fallback_note(splits: Mapping[str, Split]) -> str | None:
    """A warning naming the labeled splits whose T/A/V labels are copies of M while other splits
    have their own; None when all or none have them (MOSI/MOSEI files have none: silent)."""
    filled = [s.name for s in splits.values() if s.labels and s.unimodal_from_multimodal]
    own = [s.name for s in splits.values() if s.labels and not s.unimodal_from_multimodal]
    if not filled or not own:
        return None
    names = ", ".join(f"'{name}'" for name in filled)
    return (f"split(s) {names} have no unimodal labels (regression_labels_T/A/V) while "
            f"{', '.join(repr(name) for name in own)} have them: the T/A/V labels of {names} fall back to "
            "the multimodal label 'regression_labels'")


def is_labeled_file(data: Mapping) -> bool:
    """Whether unpickled ``data`` is meant as a labeled file: it has ``train``, ``valid`` and
    ``test``, and none of them is a split dict without ``regression_labels`` (a split that is not a
    dict at all counts: reading the file then names the problem)."""
    return all(s in data and not (isinstance(data[s], Mapping) and LABEL_KEYS["M"] not in data[s])
               for s in LABELED_SPLITS)


def labeled_gaps(data: Mapping) -> dict[str, Any] | None:
    """What keeps a file whose splits carry labels from being a complete labeled file:
    ``missing_splits`` (of train/valid/test) and ``missing_keys`` per split. None when nothing is
    missing, or when no split carries ``regression_labels`` (an unlabeled file)."""
    key = LABEL_KEYS["M"]
    parts = {s: data[s] for s in LABELED_SPLITS if isinstance(data.get(s), Mapping)}
    if not any(key in part for part in parts.values()):
        return None
    missing_splits = [s for s in LABELED_SPLITS if s not in parts]
    missing_keys = {s: [key] for s, part in parts.items() if key not in part}
    return {"missing_splits": missing_splits, "missing_keys": missing_keys} if missing_splits or missing_keys else None


def train_mix_mask(part: Any, file: Path) -> np.ndarray:
    """The ``mask`` of a ``train_mix`` split (1 = labeled, 0 = unlabeled), checked to hold one
    0/1 entry per clip."""
    split = "train_mix"
    if not isinstance(part, Mapping):
        raise err(f"expected a dict of arrays, got {type(part).__name__}", file, split)
    if "mask" not in part:
        raise err("missing key (1 = labeled, 0 = unlabeled)", file, split, "mask")
    mask = column(as_array(part["mask"], file, split, "mask"))
    check_rank(mask, 1, file, split, "mask", "one entry per clip")
    check_real(mask, file, split, "mask", "1 = labeled, 0 = unlabeled")
    n = _feature_array(part, MODALITIES[0], file, split).shape[0]
    check_n(n, mask.shape[0], file, split, "mask", MODALITIES[0])
    bad = ~np.isin(mask, (0, 1))
    if bad.any():
        i = first_bad(bad)[0]
        raise err(f"expected 1 (labeled) or 0 (unlabeled), got {shown(mask[i])} at clip {i} "
                  f"({int(bad.sum())} such entries)", file, split, "mask")
    return mask


def pretraining_split_names(data: Mapping, path: Path) -> list[str]:
    """The splits pre-training reads from a file without ``train_mix``: every split dict, except the
    ``test`` split of a labeled file (one with labels, or with all of ``train``, ``valid`` and
    ``test``, which warns when it has no labels). Its other splits (e.g. ``extra``) are kept."""
    names = [k for k, v in data.items() if isinstance(v, Mapping)]
    for name in (*LABELED_SPLITS, "train_mix"):
        if name in data and not isinstance(data[name], Mapping):
            raise err(f"expected a dict of arrays, got {type(data[name]).__name__}", path, name)
    odd = [k for k in names if not isinstance(k, str)]
    if odd:
        raise err(f"expected split names to be strings, got {odd[0]!r} ({type(odd[0]).__name__}) "
                  f"among the splits {_split_names(data)}", path)
    has_labels, complete = any(LABEL_KEYS["M"] in data[s] for s in names), all(s in names for s in LABELED_SPLITS)
    if complete and not has_labels:
        warnings.warn(f"file '{path}' has splits 'train', 'valid' and 'test' but no labels: it is read as a "
                      "labeled file, so its 'test' clips are left out of pre-training (rename the split, "
                      "e.g. to 'more', to pre-train on them)", stacklevel=3)
    if has_labels or complete:  # a labeled file: never pre-train on its test clips
        names = [s for s in names if s != "test"]
    if not names:
        raise err(f"expected at least one split dict (a labeled file's 'test' split is never used for "
                  f"pre-training), got keys {_split_names(data)}", path)
    return names


def read_unlabeled(path: str | Path, data: dict | None = None) -> dict[str, Split]:
    """Read unlabeled clips for pre-training, from either layout:

    * a file whose splits (any names, typically ``train`` and ``valid``) hold features; label keys,
      if any, are ignored, and a file with labels (or with all of ``train``, ``valid`` and
      ``test``, which is read as a labeled file) never gives its ``test`` clips, but gives every
      other split (see :func:`pretraining_split_names`);
    * a labeled file with a ``train_mix`` split and a ``mask`` (1 = labeled, 0 = unlabeled), as the
      CH-SIMS v2 AV-MC code reads it: the unlabeled rows become split ``train``.
    """
    path = Path(path)
    data = load_pickle_dict(path) if data is None else data
    if "train_mix" in data:
        keep = np.flatnonzero(train_mix_mask(data["train_mix"], path) == 0)
        if keep.size == 0:
            raise err("empty split: no unlabeled rows (mask == 0)", path, "train_mix", "mask")
        splits = {"train": take(read_split(data["train_mix"], path, "train_mix", labeled=False), keep, "train")}
    else:
        names = pretraining_split_names(data, path)
        splits = {s: read_split(data.pop(s), path, s, labeled=False) for s in names}
    check_same_dims(splits, path)
    return splits


def take(split: Split, index: np.ndarray, name: str | None = None) -> Split:
    """Rows ``index`` of ``split`` as a new split."""
    index = np.asarray(index)
    return replace(
        split, name=name or split.name,
        features={m: np.asarray(split.features[m][index]) for m in MODALITIES},
        lengths={m: split.lengths[m][index] for m in MODALITIES},
        ids=[split.ids[i] for i in index], raw_text=[split.raw_text[i] for i in index],
        labels={k: v[index] for k, v in split.labels.items()} if split.labels else None,
    )
