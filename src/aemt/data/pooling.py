"""Sequence standardisation (paper §4.2.1): average pooling of every modality to one length.

Only the *valid* frames of a clip are pooled, so padding never dilutes an average. A clip with
``l >= T`` valid frames is cut into ``T`` adaptive windows ``[floor(i·l/T), ceil((i+1)·l/T))``
(the windows of ``torch.nn.functional.adaptive_avg_pool1d`` applied to the valid part); a clip
with ``l < T`` frames keeps them as they are and stays padded, with new length ``l``.
Vectorised: each window's sum is a batched matmul of the frames with a 0/1 window matrix, in
float64 (the same float32 results as summing each window in float64), over chunks of clips that
bound the temporaries; inputs no longer than ``T`` frames are only copied.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

Stats = dict[str, tuple[np.ndarray, np.ndarray]]  # per-modality (mean, std)


def pooled_lengths(lengths: np.ndarray, target_len: int) -> np.ndarray:
    """Valid lengths after pooling: ``min(l, target_len)``."""
    return np.minimum(np.asarray(lengths, dtype=np.int64), target_len)


def _window_bounds(lengths: np.ndarray, target_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Start/end frame (exclusive) of each output step, per clip: (N, T) each."""
    lengths = lengths[:, None]
    steps = np.arange(target_len)[None, :]
    start = (steps * lengths) // target_len
    end = -((-(steps + 1) * lengths) // target_len)  # ceil division
    short = lengths < target_len  # no pooling: step i is frame i
    start = np.where(short, steps, start)
    end = np.where(short, steps + 1, end)
    return start, end


def pool_valid(features: np.ndarray, lengths: np.ndarray, target_len: int,
               chunk_elements: int = 1 << 21) -> tuple[np.ndarray, np.ndarray]:
    """Average-pool ``features`` (N, L, D) over valid frames to (N, target_len, D) float32.

    Returns the pooled array (zero after the new lengths) and the new lengths (N,).
    """
    n, length, dim = features.shape
    lengths = np.asarray(lengths, dtype=np.int64)
    new_lengths = pooled_lengths(lengths, target_len)
    out = np.zeros((n, target_len, dim), dtype=np.float32)
    if length <= target_len:  # every clip is short: its frames stay as they are
        out[:, :length] = features
        out[:, :length][np.arange(length)[None, :] >= new_lengths[:, None]] = 0.0  # padding, in place
        return out, new_lengths
    frames = np.arange(length)
    chunk = max(1, chunk_elements // (length * (target_len + dim)))  # window (T, L) and frames (L, D) per clip
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        start, end = _window_bounds(lengths[lo:hi], target_len)  # (c, T)
        valid = np.arange(target_len)[None, :] < new_lengths[lo:hi, None]
        window = (frames >= start[..., None]) & (frames < end[..., None]) & valid[..., None]  # (c, T, L)
        x = features[lo:hi].astype(np.float64)
        x[frames[None, :] >= lengths[lo:hi, None]] = 0.0  # padding (even NaN) must not reach a sum
        total = np.matmul(window.astype(np.float64), x)  # (c, T, D)
        out[lo:hi] = total / np.maximum(end - start, 1)[..., None]
    return out, new_lengths


def pool_valid_reference(features: np.ndarray, lengths: np.ndarray, target_len: int) -> np.ndarray:
    """Slow per-clip reference of :func:`pool_valid` (for tests)."""
    n, _, dim = features.shape
    out = np.zeros((n, target_len, dim), dtype=np.float64)
    for i in range(n):
        valid = features[i, : int(lengths[i])].astype(np.float64)
        if len(valid) < target_len:
            out[i, : len(valid)] = valid
            continue
        for t in range(target_len):
            a = (t * len(valid)) // target_len
            b = -(-((t + 1) * len(valid)) // target_len)
            out[i, t] = valid[a:b].mean(axis=0)
    return out.astype(np.float32)


def feature_stats(features: np.ndarray, lengths: np.ndarray,
                  chunk_elements: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over the valid frames of (N, L, D) ``features`` (float32; a
    std under 1e-6 becomes 1, and a modality without a valid frame gets mean 0, std 1).

    Two passes in float64 over chunks of clips (the mean, then the squared deviations from it), so
    the temporaries stay the size of a chunk, not of the split."""
    n, length, dim = features.shape
    lengths = np.asarray(lengths)
    rows = max(1, chunk_elements // max(1, length * dim))

    def chunks():
        for lo in range(0, n, rows):
            valid = np.arange(length)[None, :] < lengths[lo:lo + rows, None]
            yield features[lo:lo + rows][valid].astype(np.float64)  # (frames, D)

    count = int(np.minimum(lengths, length).sum())
    if count == 0:
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    mean = sum((frames.sum(axis=0) for frames in chunks()), np.zeros(dim)) / count
    std = np.sqrt(sum((np.square(frames - mean).sum(axis=0) for frames in chunks()), np.zeros(dim)) / count)
    return mean.astype(np.float32), np.where(std < 1e-6, 1.0, std).astype(np.float32)


def standardize(features: np.ndarray, lengths: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Z-score valid frames with given statistics; padding stays exactly 0."""
    out = np.subtract(features, mean, dtype=np.float32)
    out /= std
    out[np.arange(features.shape[1])[None, :] >= np.asarray(lengths)[:, None]] = 0.0
    return out


def stats_to_arrays(stats: Stats) -> dict[str, np.ndarray]:
    """Statistics as the named arrays of an ``.npz`` file: ``{modality}_mean``, ``{modality}_std``."""
    return {f"{m}_{k}": v for m, pair in stats.items() for k, v in zip(("mean", "std"), pair)}


def stats_from_arrays(arrays: Mapping[str, np.ndarray], modalities: Sequence[str]) -> Stats:
    """The statistics of ``modalities`` that :func:`stats_to_arrays` wrote (KeyError if one is missing)."""
    return {m: (arrays[f"{m}_mean"], arrays[f"{m}_std"]) for m in modalities}
