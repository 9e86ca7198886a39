"""``aemt data inspect``: a summary of an MMSA file without loading any model code."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from aemt.data.mmsa import (LABELED_SPLITS, MODALITIES, Split, check_same_dims, labeled_gaps, load_pickle_dict,
                            pretraining_split_names, read_labeled, read_split, read_unlabeled, train_mix_mask,
                            unimodal_fallback_note)

_SIMS_EDGES = [-1.01, -0.7, -0.1, 0.1, 0.7, 1.01]
_MOSEI_EDGES = [-3.01, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.01]


def _histogram(values: np.ndarray, sims_range: bool) -> dict[str, int]:
    edges = _SIMS_EDGES if sims_range else _MOSEI_EDGES
    counts = np.histogram(values, bins=edges)[0]
    return {f"({lo:g},{hi:g}]": int(c) for lo, hi, c in zip(edges[:-1], edges[1:], counts)}


def _split_report(split: Split, sims_range: bool) -> dict[str, Any]:
    mods = {}
    for m in MODALITIES:
        lens = split.lengths[m]
        mods[m] = {"shape": list(split.features[m].shape[1:]), "nonfinite": int(split.nonfinite.get(m, 0)),
                   "lengths": {"min": int(lens.min()), "mean": float(lens.mean()), "max": int(lens.max())}}
    report: dict[str, Any] = {"clips": split.n, "modalities": mods}
    if split.labels:
        keys = ["M"] if split.unimodal_from_multimodal else ["M", "T", "A", "V"]
        report["label_histograms"] = {k: _histogram(split.labels[k], sims_range) for k in keys}
    return report


def inspect_file(path: str | Path) -> dict[str, Any]:
    """Validate ``path`` and summarise each split (shapes, lengths, labels, non-finite counts)."""
    path = Path(path)
    top = load_pickle_dict(path)
    extra = _layout_report(top, path)  # first: the readers below may change `top`
    labeled = all(isinstance(top.get(s), dict) and "regression_labels" in top[s] for s in LABELED_SPLITS)
    more: dict[str, Split] = {}  # a labeled file's extra splits, read by pre-training only
    left: dict[str, Split] = {}  # an unlabeled file's splits that pre-training leaves out
    if not labeled and "train_mix" not in top:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its warning comes again from read_unlabeled below, recorded there
            names = pretraining_split_names(top, path)
        if not extra["labeled_file_incomplete"]:  # that warning already says the test clips are not shown
            left = {n: v for n, v in top.items() if isinstance(v, dict) and n not in names}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # kept for the report's warnings (the non-finite counts are its own)
        if labeled:
            names = [] if "train_mix" in top else pretraining_split_names(top, path)
            splits = read_labeled(path, data=top)
            more = {n: read_split(top.pop(n), path, n, labeled=False) for n in names if n not in LABELED_SPLITS}
            check_same_dims({**splits, **more}, path)
        else:  # an unlabeled train_mix file: its one split is in `extra` (read once, its counts intact)
            splits = {} if "train_mix" in top else read_unlabeled(path, data=top)
            left = {n: read_split(part, path, n, labeled=False) for n, part in left.items()}
    sims_range = labeled and all(np.abs(s.labels["M"]).max() <= 1.0 for s in splits.values())
    filled = [name for name, s in splits.items() if s.unimodal_from_multimodal]
    report = {
        "file": str(path),
        "kind": _kind(labeled, sims_range, list(left)),
        "splits": {name: _split_report(s, sims_range) for name, s in {**splits, **more, **left}.items()},
        "unimodal_from_multimodal": bool(filled),
        "unimodal_from_multimodal_splits": filled,
        "pretraining_only_splits": list(more),
        "left_out_of_pretraining_splits": list(left),
    }
    note = unimodal_fallback_note(splits)
    extra["warnings"] += [str(w.message) for w in caught if w.category is UserWarning and not (
        "replaced non-finite feature values" in str(w.message) or (note and str(w.message).endswith(note)))]
    if note:
        extra["warnings"].append(note)
    report["splits"].update(extra.pop("splits"))
    report.update(extra)
    return report


def _kind(labeled: bool, sims_range: bool, left_out: list[str]) -> str:
    """The kind of file, as training reads it."""
    if labeled:
        return "labeled, labels in " + ("[-1, 1] (SIMS-like)" if sims_range else "[-3, 3] (MOSI/MOSEI-like)")
    if left_out:
        return f"unlabeled, read as a labeled file: {', '.join(left_out)} left out of pre-training"
    return "unlabeled"


def _layout_report(top: dict[str, Any], path: Path) -> dict[str, Any]:
    """Gaps of a labeled file that is read as unlabeled, and a CH-SIMS v2 ``train_mix`` split with
    the clips its mask marks unlabeled."""
    gaps = labeled_gaps(top)
    extra: dict[str, Any] = {"labeled_file_incomplete": gaps, "warnings": [], "splits": {}}
    if gaps:
        missing = [f"split '{s}'" for s in gaps["missing_splits"]]
        missing += [f"key '{k}' in split '{s}'" for s, keys in gaps["missing_keys"].items() for k in keys]
        extra["warnings"].append(
            f"incomplete labeled file: missing {', '.join(missing)}; shown as pre-training reads it (unlabeled, "
            "without its test clips); finetune and evaluate need splits train, valid and test with 'regression_labels'")
    if "train_mix" in top:
        unused = [k for k, v in top.items() if isinstance(v, dict) and k not in (*LABELED_SPLITS, "train_mix")]
        if unused:
            extra["warnings"].append(
                f"split(s) {', '.join(repr(k) for k in unused)} are read by nothing: pre-training reads only the "
                "unlabeled rows of 'train_mix' from this file, finetune and evaluate only train, valid and test")
        mask = train_mix_mask(top["train_mix"], path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the counts are part of the report
            split = read_split(top["train_mix"], path, "train_mix", labeled=False)
        extra["splits"]["train_mix"] = {**_split_report(split, False), "unlabeled_clips": int((mask == 0).sum())}
    return extra
