"""From an MMSA file to model-ready arrays: validate, pool to one length, cache, standardise.

``load_labeled`` / ``load_unlabeled`` return an :class:`MSAData` whose splits hold pooled
float32 arrays (N, T, D) per modality, valid lengths and labels. Pooled arrays are cached
(:mod:`aemt.data.cache`: ``.npy`` files memory-mapped on the next load, under ``cache_dir``, default
``$AEMT_CACHE_DIR`` or ``~/.cache/aemt``, in a folder keyed by the source file's SHA-256 and the
pooling settings), so the second load of the same file skips unpickling and pooling.
Standardisation (optional) uses statistics of the ``train`` split only; the standardised splits
and their statistics are cached too, beside the pooled ones (except for a validation split drawn
at random), so a run's load memory-maps them and computes nothing. The statistics are saved with
a run and reused at prediction time, on the pooled arrays.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from aemt.data.cache import cache_root, cached_digest, entry_name, read_entry, read_notes, write_entry
from aemt.data.mmsa import (LABEL_RANGES, MODALITIES, Split, check_label_range, check_same_dims, is_labeled_file,
                            load_pickle_dict, read_labeled, read_split, read_unlabeled, take)
from aemt.data.pooling import Stats, feature_stats, pool_valid, standardize
from aemt.errors import DataError
from aemt.io_utils import require_file

@dataclass
class MSAData:
    """Pooled splits of one file, plus what is needed to reproduce the preprocessing."""

    source: Path
    splits: dict[str, Split]
    dims: dict[str, int]
    seq_len: int
    stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # per-modality (mean, std)
    from_cache: bool = False
    unimodal_from_multimodal: bool = field(default=False)

    def __getitem__(self, split: str) -> Split:
        if split not in self.splits:
            raise DataError(f"no such split; available: {sorted(self.splits)}", file=str(self.source), split=split)
        return self.splits[split]


def pool_split(split: Split, seq_len: int, text_input: str) -> Split:
    """Pool every modality of ``split`` to ``seq_len`` frames (text: to 1 frame with ``cls``)."""
    feats, lengths = {}, {}
    for m in MODALITIES:
        x, lens = split.features.pop(m), split.lengths[m]
        if m == "text" and text_input == "cls":
            feats[m], lengths[m] = np.ascontiguousarray(x[:, :1]), np.ones_like(lens)
        else:
            feats[m], lengths[m] = pool_valid(x, lens, seq_len)
        del x
    return replace(split, features=feats, lengths=lengths)


def _cache_folder(path: Path, kind: str, seq_len: int, text_input: str, cache_dir: str | Path | None) -> Path | None:
    """Where the pooled arrays of ``path`` read as ``kind`` are cached (None: caching is off);
    checks first that ``path`` is a file."""
    require_file(path)
    if cache_dir == "off":
        return None
    root = cache_root(cache_dir)
    return root / entry_name(cached_digest(path, root), seq_len, text_input, kind)


def _from_cache(folder: Path | None, path: Path, label_range: tuple[float, float]) -> dict[str, Split] | None:
    """The cached splits in ``folder``, checked as a first read checks them; None on a miss."""
    entry = None if folder is None else read_entry(folder)
    if entry is None:
        return None
    for split in entry[0].values():  # the range depends on the metrics asked for, not on the file
        check_label_range(split, path, label_range)
    # what the first read warned of, naming this file (an entry serves every copy of the same bytes)
    _warn_of([note.replace(_SOURCE, str(path)) for note in read_notes(folder)])
    return entry[0]


_SOURCE = "\x00source\x00"  # stands for the source file's path in the saved notes


def _warn_of(notes: list[str]) -> None:
    """Give the data warnings ``notes``; from one line, so that a process shows each once by
    default whether it read the file or hit the cache."""
    for note in notes:
        warnings.warn(note, UserWarning)


@contextmanager
def _kept_warnings(path: Path) -> Iterator[list[str]]:
    """Give the warnings raised in the block as usual, and collect the messages of its
    ``UserWarning``s (the data warnings: non-finite values, missing transcripts, left-out splits,
    ...) into the yielded list, to be saved with the cache entry and given again on every hit; the
    source ``path`` in them is saved as a placeholder."""
    notes: list[str] = []
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield notes
    finally:  # the caller's filters decide what is shown (also when the read failed)
        for w in caught:
            if w.category is UserWarning:
                _warn_of([str(w.message)])
                notes.append(str(w.message).replace(str(path), _SOURCE))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _pool_and_cache(folder: Path | None, raw: dict[str, Split], seq_len: int, text_input: str,
                    notes: list[str] | None = None) -> dict[str, Split]:
    """Pool every split of ``raw`` and cache them, with the warnings ``notes`` that reading them gave."""
    splits = {name: pool_split(raw.pop(name), seq_len, text_input) for name in list(raw)}
    _try_to_cache(folder, splits, notes=notes)
    return splits


def _try_to_cache(folder: Path | None, splits: dict[str, Split], stats: Stats | None = None,
                  notes: list[str] | None = None) -> None:
    if folder is not None:
        try:
            write_entry(folder, splits, stats, notes)
        except OSError as e:  # a read-only or full cache folder: work without a cache
            warnings.warn(f"cannot write the data cache under '{folder.parent}' ({e.strerror or e}); running "
                          "without it (set data.cache_dir or $AEMT_CACHE_DIR to a writable folder, or 'off')")


def _load_pooled(path: Path, kind: str, seq_len: int, text_input: str, cache_dir: str | Path | None,
                 label_range: tuple[float, float]) -> tuple[dict[str, Split], bool, Path | None]:
    """The pooled splits of ``path`` read as ``kind``, whether they came from the cache, and their
    cache folder (None: caching is off)."""
    folder = _cache_folder(path, kind, seq_len, text_input, cache_dir)
    cached = _from_cache(folder, path, label_range)
    if cached is not None:
        return cached, True, folder
    with _kept_warnings(path) as notes:
        raw = read_labeled(path, label_range) if kind == "labeled" else read_unlabeled(path)
    return _pool_and_cache(folder, raw, seq_len, text_input, notes=notes), False, folder


def _read_every_split(path: Path, data: dict) -> dict[str, Split]:
    """Every clip of a file without labels, split by split in file order (of a ``train_mix`` split:
    its unlabeled rows); unlike :func:`read_unlabeled`, ``test`` is kept."""
    names = [name for name, part in data.items() if isinstance(part, Mapping)]
    if "train_mix" in data or not names:  # read_unlabeled takes train_mix's unlabeled rows (or names the problem)
        return read_unlabeled(path, data=data)
    splits = {str(name): read_split(data.pop(name), path, str(name), labeled=False) for name in names}
    check_same_dims(splits, path)
    return splits


def load_for_prediction(path: str | Path, *, seq_len: int = 50, text_input: str = "sequence",
                        metrics: str | None = None, cache_dir: str | Path | None = None) -> MSAData:
    """The clips of any MMSA file, pooled (not standardised), for a trained model to score.

    A labeled file gives its ``train``/``valid``/``test`` splits with labels, as
    :func:`load_labeled`; any other file gives every split it holds, without labels, in file order
    (of a ``train_mix`` split: its unlabeled rows). Either is cached; the file is unpickled at most once."""
    path = Path(path)
    label_range = LABEL_RANGES["sims" if metrics == "sims" else "mosei"]
    folders = {kind: _cache_folder(path, kind, seq_len, text_input, cache_dir) for kind in ("labeled", "every-split")}
    for folder in folders.values():
        cached = _from_cache(folder, path, label_range)
        if cached is not None:
            return _wrap(path, cached, seq_len, None, True)
    data = load_pickle_dict(path)
    labeled = is_labeled_file(data)
    with _kept_warnings(path) as notes:
        raw = read_labeled(path, label_range, data=data) if labeled else _read_every_split(path, data)
    del data  # the raw arrays are freed split by split as they are pooled
    splits = _pool_and_cache(folders["labeled" if labeled else "every-split"], raw, seq_len, text_input, notes=notes)
    return _wrap(path, splits, seq_len, None, False)


def standardize_split(split: Split, stats: Stats) -> Split:
    """``split`` with every modality z-scored by ``stats`` (padding stays 0)."""
    return replace(split, features={m: standardize(split.features[m], split.lengths[m], *stats[m]) for m in MODALITIES})


def compute_stats(split: Split) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-modality feature mean/std over the valid frames of ``split``."""
    return {m: feature_stats(split.features[m], split.lengths[m]) for m in MODALITIES}


def _finish(path: Path, splits: dict[str, Split], seq_len: int, do_standardize: bool,
            stats: dict | None, from_cache: bool, standardized_entry: Path | None = None) -> MSAData:
    """Standardise ``splits`` (with ``stats``, else the train split's, then saved as
    ``standardized_entry`` when given) and wrap them as :class:`MSAData`."""
    if do_standardize:
        own_stats = stats is None
        stats = stats or compute_stats(splits.get("train") or next(iter(splits.values())))
        splits = {name: standardize_split(split, stats) for name, split in splits.items()}
        if own_stats:
            _try_to_cache(standardized_entry, splits, stats)
    else:
        stats = None
    return _wrap(path, splits, seq_len, stats, from_cache)


def _wrap(path: Path, splits: dict[str, Split], seq_len: int, stats: dict | None, from_cache: bool) -> MSAData:
    first = next(iter(splits.values()))
    dims = {m: int(first.features[m].shape[2]) for m in MODALITIES}
    filled = any(s.unimodal_from_multimodal for s in splits.values())
    return MSAData(path, splits, dims, seq_len, stats, from_cache, filled)


def _standardized(pooled_entry: Path | None, wanted: bool,
                  variant: str = "") -> tuple[Path | None, tuple[dict[str, Split], Stats] | None]:
    """Where the splits standardised with their train statistics are cached, beside the pooled
    entry (None when not ``wanted`` or caching is off), and their ``(splits, stats)`` if they are:
    a run then memory-maps them and computes nothing."""
    if pooled_entry is None or not wanted:
        return None, None
    folder = pooled_entry.with_name(f"{pooled_entry.name}-standardized{variant}")
    return folder, read_entry(folder, with_stats=True)


def warm_cache(path: str | Path, kind: str, *, seq_len: int = 50, text_input: str = "sequence",
               cache_dir: str | Path | None = None, standardize: bool = False) -> None:
    """Pool a ``kind`` ("labeled" or "unlabeled") file into the cache now (``standardize``: its
    standardised splits too), so that processes started later each memory-map it instead of each
    computing it (and holding the raw file). Label ranges are checked by each run, not here."""
    if cache_dir == "off":
        return
    kw = dict(seq_len=seq_len, text_input=text_input, cache_dir=cache_dir)
    if standardize:  # (metrics None: the widest label range)
        (load_labeled if kind == "labeled" else load_unlabeled)(path, **kw)
    else:
        widest = (min(lo for lo, _ in LABEL_RANGES.values()), max(hi for _, hi in LABEL_RANGES.values()))
        _load_pooled(Path(path), kind, seq_len, text_input, cache_dir, widest)


def load_labeled(path: str | Path, *, seq_len: int = 50, text_input: str = "sequence",
                 standardize_features: bool = True, metrics: str | None = None,
                 stats: dict | None = None, cache_dir: str | Path | None = None) -> MSAData:
    """Load the train/valid/test splits of a labeled MMSA file, pooled to ``seq_len``.

    ``metrics`` ("sims" or "mosei") sets the admitted label range ([-1, 1] or [-3, 3]);
    ``stats`` reuses saved standardisation statistics instead of the train split's;
    ``cache_dir="off"`` disables the pooled-array cache.
    """
    label_range = LABEL_RANGES["sims" if metrics == "sims" else "mosei"]
    splits, cached, folder = _load_pooled(Path(path), "labeled", seq_len, text_input, cache_dir, label_range)
    entry, hit = _standardized(folder, standardize_features and stats is None)
    if hit:
        return _wrap(Path(path), hit[0], seq_len, hit[1], cached)
    return _finish(Path(path), splits, seq_len, standardize_features, stats, cached, entry)


def load_unlabeled(path: str | Path, *, seq_len: int = 50, text_input: str = "sequence",
                   standardize_features: bool = True, valid_fraction: float = 0.1, seed: int = 0,
                   stats: dict | None = None, cache_dir: str | Path | None = None) -> MSAData:
    """Load unlabeled clips for pre-training as splits ``train`` and ``valid``.

    A file with a ``valid`` split keeps it; otherwise ``valid_fraction`` of the clips (at least
    one) is held out at random with ``seed``. Other splits join ``train``. ``valid_fraction <= 0``
    returns one split ``all`` with every clip in file order. A labeled file gives every split but
    ``test`` (never its test clips); extra splits join ``train``.
    """
    splits, cached, folder = _load_pooled(Path(path), "unlabeled", seq_len, text_input, cache_dir, (-3.0, 3.0))
    random_valid = valid_fraction > 0 and "valid" not in splits  # not cached: one copy per seed would pile up
    entry, hit = _standardized(folder, standardize_features and stats is None and not random_valid,
                               "-all" if valid_fraction <= 0 else "")
    if hit:
        return _wrap(Path(path), hit[0], seq_len, hit[1], cached)
    if valid_fraction <= 0:  # every clip, in file order (prediction)
        splits = {"all": concat_splits(list(splits.values()), "all")}
    elif "valid" in splits:
        rest = [s for name, s in splits.items() if name != "valid"]
        if not rest:
            raise DataError("no clips to pre-train on: pre-training trains on every split except 'valid' and "
                            "validates on 'valid' (a file without 'valid' has a fraction of its clips held out); "
                            f"got only splits {sorted(splits)}", file=str(path), split="train")
        train = rest[0] if len(rest) == 1 else concat_splits(rest, "train")
        splits = {"train": train, "valid": splits["valid"]}
    else:
        whole = concat_splits(list(splits.values()), "train")
        if whole.n < 2:
            raise DataError(f"expected at least 2 unlabeled clips to hold out a validation split, got {whole.n}",
                            file=str(path))
        order = np.random.default_rng(seed).permutation(whole.n)
        n_valid = max(1, int(round(whole.n * valid_fraction)))
        splits = {"train": take(whole, order[n_valid:], "train"), "valid": take(whole, order[:n_valid], "valid")}
    return _finish(Path(path), splits, seq_len, standardize_features, stats, cached, entry)


def concat_splits(splits: list[Split], name: str) -> Split:
    """Clips of several splits, in order, as one split (features, lengths, ids, text; no labels)."""
    if len(splits) == 1:
        return replace(splits[0], name=name)
    return Split(
        name=name,
        features={m: np.concatenate([s.features[m] for s in splits]) for m in MODALITIES},
        lengths={m: np.concatenate([s.lengths[m] for s in splits]) for m in MODALITIES},
        ids=[i for s in splits for i in s.ids], raw_text=[t for s in splits for t in s.raw_text],
        nonfinite={m: sum(s.nonfinite.get(m, 0) for s in splits) for m in MODALITIES},
    )
