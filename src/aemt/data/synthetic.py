"""Synthetic multimodal sentiment data in the MMSA pickle layout (numpy only).

``make_synthetic`` draws clips with learnable, documented structure so that the whole pipeline
(pre-training, fine-tuning, evaluation, case study) can be run and tested without the real
CH-SIMS v2.0 / CMU-MOSEI files. Everything is deterministic in ``seed``.

Fixed per dataset (drawn once from the seed, shared by all splits and the unlabeled set):
  * a unit "pattern direction" ``w_m`` in feature space per modality m in {text, audio, vision};
  * a context projection ``P_m`` (``CTX_DIM`` x D_m), a different matrix per modality;
  * a per-feature mean ``b_m`` and a per-feature scale ``g_m`` (log-normal), like raw features.

Per clip:
  * latents: a shared clip sentiment ``c ~ N(0, 1)`` and per-modality ``e_m ~ N(0, 1)``;
    ``u_m = clip(SPREAD * (RHO * c + sqrt(1 - RHO^2) * e_m), -1, 1)`` -- correlated, not equal.
  * unimodal labels T/A/V: ``u_m`` scaled to the label range (1 for sims2, 3 for mosei) and
    rounded to the grid (0.2 for sims2, 1/3 for mosei).
  * multimodal label M (on the unit scale, then clipped, scaled and rounded the same way):
    ``0.5 T + 0.2 A + 0.3 V`` normally, but when text and vision disagree in polarity
    (``T * V < 0`` with both ``|.| >= 0.2``) the audio decides: ``0.2 T + 0.6 A + 0.2 V``.
    So M differs from T for most clips and is not a linear function of the unimodal labels.
  * ``classification_labels``: 0 if M < -0.1, 2 if M > 0.1, else 1 (MMSA's 3-class bins for
    SIMS; on MOSEI's 1/3 grid only exactly 0 is neutral).
  * valid lengths: ``round(U(0.4, 1.0) * L)`` (at least 1) for text, audio and vision separately.
  * a context latent ``k ~ N(0, I_CTX_DIM)`` shared by the three modalities of the clip and added
    to every valid frame of modality m as ``k @ P_m``; a modality swapped in from another clip
    carries another ``k`` (modality-consistency detection).
  * nuisance: an offset ("speaker / recording") vector ``N(0, OFFSET_STD^2 I)`` per clip and
    modality added to all valid frames, a per-clip gain ``exp(N(0, GAIN_STD^2))``, and i.i.d.
    per-frame noise ``N(0, NOISE_STD^2)``.
  * evidence localised in time: modality m's unimodal label (unit scale) times ``AMP[m]`` times
    ``w_m`` times a half-sine bump over a window of ``round(U(0.15, 0.35) * len)`` frames placed
    uniformly inside the valid frames; elsewhere only nuisance. Text also carries a weaker
    copy (``CLS_AMP``) at position 0, like BERT's [CLS] summary.
  * frame = ``g_m * gain * (b_m + offset + k @ P_m + bump * AMP_m * label_m * w_m + noise)`` on
    valid frames, exactly 0 after the valid length (text too: positions >= text length are 0).
  * ``text_bert``: row 0 token ids ([CLS]=101, random ids, [SEP]=102 last), row 1 the attention
    mask (ones up to the text length), row 2 zeros. ``raw_text`` is a short made-up sentence whose
    words follow the sign of T (positive / negative / neutral word lists).
  * ``nonfinite_rate`` > 0 sets that share of the valid audio values to ``-inf`` (as in MMSA).

Time-averaged valid features dilute the window evidence (it covers 15-35% of the frames) and mix
it with the clip offset, so a ridge regression on them reaches Pearson r of roughly 0.5-0.6 on the
small test split, while a linear fit on the (smoothed) peak of each modality's projection onto
``w_m`` reaches ~0.85-0.9: a model that finds the window sees a much cleaner signal.
Features are written split by split and in chunks, in float32, so peak memory stays close to
the size of the output.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from aemt.errors import DataError
from aemt.io_utils import atomic_open

MODALITIES = ("text", "audio", "vision")
SHAPES: dict[tuple[str, str], dict[str, tuple[int, int]]] = {
    ("sims2", "full"): {"text": (50, 768), "audio": (925, 25), "vision": (232, 177)},
    ("mosei", "full"): {"text": (50, 768), "audio": (50, 74), "vision": (50, 35)},
    ("sims2", "small"): {"text": (24, 64), "audio": (96, 25), "vision": (48, 35)},
    ("mosei", "small"): {"text": (24, 64), "audio": (24, 74), "vision": (24, 35)},
}
_SMALL = {"train": 600, "valid": 150, "test": 200, "unlabeled": 2000}
COUNTS: dict[tuple[str, str], dict[str, int]] = {
    ("sims2", "full"): {"train": 2722, "valid": 647, "test": 1034, "unlabeled": 10161},
    ("mosei", "full"): {"train": 16326, "valid": 1871, "test": 4659, "unlabeled": 10000},
    ("sims2", "small"): dict(_SMALL),
    ("mosei", "small"): dict(_SMALL),
}
MIN_COUNTS = {"train": 1, "valid": 1, "test": 1, "unlabeled": 2}
LABEL_RANGE = {"sims2": 1.0, "mosei": 3.0}   # labels lie in [-range, range]
LABEL_STEP = {"sims2": 0.2, "mosei": 1.0 / 3.0}
CTX_DIM = 8
RHO, SPREAD = 0.7, 0.55
AMP = {"text": 6.0, "audio": 6.0, "vision": 6.0}
CLS_AMP = 1.0
OFFSET_STD, CTX_STD, NOISE_STD, GAIN_STD = 0.7, 0.6, 1.0, 0.2
_CHUNK_FLOATS = 1 << 24                       # ~64 MB of float32 per chunk and modality

_WORDS = {
    "pos": ["great", "wonderful", "lovely", "happy", "excellent", "delightful", "amazing"],
    "neg": ["terrible", "awful", "sad", "boring", "horrible", "disappointing", "annoying"],
    "neu": ["okay", "ordinary", "fine", "average", "normal", "plain", "so-so"],
}
_SUBJECTS = ["the movie", "this phone", "my day", "the food", "that song", "the trip", "the show"]
_ADVERBS = {"pos": ["really", "truly", "so"], "neg": ["really", "quite", "so"],
            "neu": ["kind of", "just", "pretty"]}


def _params(seed: int, shapes: dict[str, tuple[int, int]]) -> dict[str, dict[str, np.ndarray]]:
    """Draw the fixed per-dataset quantities (pattern directions, projections, feature stats)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    out: dict[str, dict[str, np.ndarray]] = {}
    for m in MODALITIES:
        dim = shapes[m][1]
        w = rng.standard_normal(dim)
        out[m] = {
            "w": (w / np.linalg.norm(w)).astype(np.float32),
            "P": (rng.standard_normal((CTX_DIM, dim)) * CTX_STD / np.sqrt(CTX_DIM)).astype(np.float32),
            "mean": (rng.standard_normal(dim) * 0.5).astype(np.float32),
            "scale": np.exp(rng.standard_normal(dim) * 0.5).astype(np.float32),
        }
    return out


def _quantize(u: np.ndarray, preset: str) -> np.ndarray:
    """Unit-scale values -> labels in [-range, range] on the preset's grid (float32)."""
    r, step = LABEL_RANGE[preset], LABEL_STEP[preset]
    return (np.round(np.clip(u, -1.0, 1.0) * r / step) * step).astype(np.float32)


def _sentence(rng: np.random.Generator, t_label: float) -> str:
    pol = "pos" if t_label > 0.1 else "neg" if t_label < -0.1 else "neu"
    subj, adv, adj = rng.choice(_SUBJECTS), rng.choice(_ADVERBS[pol]), rng.choice(_WORDS[pol])
    return f"I think {subj} was {adv} {adj}."


def _fill_modality(rng: np.random.Generator, out: np.ndarray, p: dict[str, np.ndarray],
                   lengths: np.ndarray, sentiment: np.ndarray, ctx: np.ndarray, gain: np.ndarray,
                   amp: float, cls: np.ndarray | None, nonfinite_rate: float) -> None:
    """Write the frames of one modality for all clips of a split into ``out`` (n, L, D), chunked."""
    n, length, dim = out.shape
    frac = rng.uniform(0.15, 0.35, n)
    width = np.maximum(1, np.round(frac * lengths)).astype(np.int64)
    start = np.floor(rng.uniform(0, 1, n) * (lengths - width + 1)).astype(np.int64)
    offset = rng.standard_normal((n, dim), dtype=np.float32) * np.float32(OFFSET_STD)
    steps = np.arange(length)
    chunk = max(1, _CHUNK_FLOATS // (length * dim))
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        x = out[sl]
        rng.standard_normal(x.shape, dtype=np.float32, out=x)
        if NOISE_STD != 1.0:
            x *= np.float32(NOISE_STD)
        rel = steps[None, :] - start[sl, None]                      # (b, L) position in window
        inside = (rel >= 0) & (rel < width[sl, None])
        bump = np.where(inside, np.sin(np.pi * (rel + 0.5) / width[sl, None]), 0.0)
        bump *= amp * sentiment[sl, None]
        if cls is not None:                                         # text: [CLS] summary
            bump[:, 0] += cls[sl]
        x += bump.astype(np.float32)[:, :, None] * p["w"]
        x += (offset[sl] + ctx[sl] @ p["P"] + p["mean"])[:, None, :]
        x *= gain[sl, None, None] * p["scale"]
        valid = steps[None, :] < lengths[sl, None]
        x *= valid[:, :, None]
        if nonfinite_rate > 0:
            hit = rng.random(x.shape, dtype=np.float32) < nonfinite_rate
            x[hit & valid[:, :, None]] = -np.inf


def _make_split(seed: int, index: int, n: int, preset: str, shapes: dict[str, tuple[int, int]],
                params: dict, first_clip: int, labeled: bool, nonfinite_rate: float) -> dict:
    """Draw one split of ``n`` clips; ``first_clip`` makes ids unique across the whole file."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    c = rng.standard_normal(n)
    e = rng.standard_normal((3, n))
    u = np.clip(SPREAD * (RHO * c + np.sqrt(1 - RHO ** 2) * e), -1.0, 1.0)
    uni = {m: _quantize(u[i], preset) for i, m in enumerate(MODALITIES)}   # T, A, V labels
    t, a, v = (uni[m] / LABEL_RANGE[preset] for m in MODALITIES)           # unit scale
    disagree = (t * v < 0) & (np.abs(t) >= 0.2 - 1e-6) & (np.abs(v) >= 0.2 - 1e-6)
    y = _quantize(np.where(disagree, 0.2 * t + 0.6 * a + 0.2 * v, 0.5 * t + 0.2 * a + 0.3 * v), preset)
    ctx = rng.standard_normal((n, CTX_DIM)).astype(np.float32)
    gain = np.exp(rng.standard_normal(n) * GAIN_STD).astype(np.float32)
    lengths = {m: np.maximum(1, np.round(rng.uniform(0.4, 1.0, n) * shapes[m][0])).astype(np.int64)
               for m in MODALITIES}
    split: dict = {}
    split["id"] = [f"video_{(k // 5) + 1:04d}$_${(k % 5) + 1:04d}" for k in range(first_clip, first_clip + n)]
    split["raw_text"] = [_sentence(rng, float(x)) for x in t]
    lt = shapes["text"][0]
    ids = rng.integers(1000, 21128, (n, lt))
    ids[:, 0] = 101
    ids[np.arange(n), lengths["text"] - 1] = np.where(lengths["text"] > 1, 102, 101)
    mask = np.arange(lt)[None, :] < lengths["text"][:, None]
    bert = np.zeros((n, 3, lt), np.float32)
    bert[:, 0] = ids * mask
    bert[:, 1] = mask
    split["text_bert"] = bert
    for i, m in enumerate(MODALITIES):
        arr = np.empty((n, *shapes[m]), np.float32)
        cls = (CLS_AMP * t).astype(np.float32) if m == "text" else None
        _fill_modality(rng, arr, params[m], lengths[m], (t, a, v)[i], ctx, gain,
                       AMP[m], cls, nonfinite_rate if m == "audio" else 0.0)
        split[m] = arr
    split["audio_lengths"] = [int(x) for x in lengths["audio"]]
    split["vision_lengths"] = [int(x) for x in lengths["vision"]]
    if labeled:
        split["regression_labels"] = y
        if preset == "sims2":
            split["regression_labels_T"], split["regression_labels_A"], split["regression_labels_V"] = (
                uni["text"], uni["audio"], uni["vision"])
        split["classification_labels"] = np.where(y < -0.1, 0, np.where(y > 0.1, 2, 1)).astype(np.float32)
    return split


def synthetic_counts(preset: str, scale: str, counts: Mapping[str, int | None], seed: int,
                     nonfinite_rate: float = 0.0, name: Callable[[str], str] = str) -> dict[str, int]:
    """Check :func:`make_synthetic`'s arguments and return the clip count of each split (``counts``
    given per split, None for the default). Raises :class:`DataError`, calling each parameter
    ``name(parameter)`` (the CLI passes its option names)."""
    if preset not in LABEL_RANGE:
        raise DataError(f"{name('preset')}: unknown synthetic preset '{preset}'; expected one of {sorted(LABEL_RANGE)}")
    if (preset, scale) not in SHAPES:
        raise DataError(f"{name('scale')}: unknown synthetic scale '{scale}'; expected 'small' or 'full'")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"{name('seed')} must be a non-negative integer, got {seed!r}")
    if not 0.0 <= float(nonfinite_rate) < 1.0:
        raise DataError(f"{name('nonfinite_rate')} must lie in [0, 1), got {nonfinite_rate!r}")
    out = dict(COUNTS[(preset, scale)])
    for split, value in counts.items():
        param = name(f"n_{split}")
        if value is not None:
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise DataError(f"{param} must be an integer, got {value!r}")
            out[split] = int(value)
        if out[split] < MIN_COUNTS[split]:
            raise DataError(f"{param} must be at least {MIN_COUNTS[split]}, got {out[split]}")
    return out


def make_synthetic(preset: str = "sims2", scale: str = "small", n_train: int | None = None,
                   n_valid: int | None = None, n_test: int | None = None,
                   n_unlabeled: int | None = None, seed: int = 0,
                   nonfinite_rate: float = 0.0) -> tuple[dict, dict]:
    """Generate a synthetic dataset in the MMSA layout (see the module docstring for the process).

    Returns ``(labeled, unlabeled)``: ``labeled = {"train", "valid", "test"}`` splits with labels;
    ``unlabeled = {"train", "valid"}`` splits without any label key, ``valid`` holding ~10% of
    ``n_unlabeled`` (at least 1). Counts default to ``COUNTS[(preset, scale)]``; labeled counts
    must be >= 1 and ``n_unlabeled`` >= 2 (``MIN_COUNTS``). Raises :class:`DataError` on bad arguments
    (see :func:`synthetic_counts`).
    """
    counts = synthetic_counts(preset, scale, {"train": n_train, "valid": n_valid, "test": n_test,
                                              "unlabeled": n_unlabeled}, seed, nonfinite_rate)
    rate = float(nonfinite_rate)
    shapes = SHAPES[(preset, scale)]
    params = _params(int(seed), shapes)
    n_uv = max(1, int(round(0.1 * counts["unlabeled"])))
    plan = [("train", counts["train"], True), ("valid", counts["valid"], True),
            ("test", counts["test"], True), ("train", counts["unlabeled"] - n_uv, False),
            ("valid", n_uv, False)]
    labeled: dict = {}
    unlabeled: dict = {}
    first = 0
    for index, (name, n, is_labeled) in enumerate(plan):
        split = _make_split(int(seed), index, n, preset, shapes, params, first, is_labeled, rate)
        (labeled if is_labeled else unlabeled)[name] = split
        first += n
    return labeled, unlabeled


def write_synthetic(out_dir: str | Path, preset: str = "sims2", scale: str = "small",
                    n_train: int | None = None, n_valid: int | None = None, n_test: int | None = None,
                    n_unlabeled: int | None = None, seed: int = 0,
                    nonfinite_rate: float = 0.0) -> tuple[Path, Path]:
    """Generate with :func:`make_synthetic` and write ``OUT_DIR/labeled.pkl`` and
    ``OUT_DIR/unlabeled.pkl`` (pickle protocol 4, each written atomically); return both paths."""
    labeled, unlabeled = make_synthetic(preset, scale, n_train, n_valid, n_test, n_unlabeled,
                                        seed, nonfinite_rate)
    out = Path(out_dir)
    paths = (out / "labeled.pkl", out / "unlabeled.pkl")
    for path, data in zip(paths, (labeled, unlabeled)):
        with atomic_open(path, "wb") as handle:  # streamed: no second in-memory copy
            pickle.dump(data, handle, protocol=4)
    return paths
