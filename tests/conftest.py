"""Shared fixtures: small MMSA-layout dicts built by hand, and an isolated pooled-array cache."""

from __future__ import annotations

import pickle

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AEMT_CACHE_DIR", str(tmp_path / "aemt-cache"))


def make_split(n: int = 6, lt: int = 5, la: int = 9, lv: int = 7, dims=(4, 3, 2), seed: int = 0,
               unimodal: bool = True, scale: float = 1.0) -> dict:
    """A random labeled split in the MMSA layout with zero padding after the lengths."""
    rng = np.random.default_rng(seed)
    audio_len = rng.integers(1, la + 1, n)
    vision_len = rng.integers(1, lv + 1, n)
    text_len = rng.integers(1, lt + 1, n)
    def padded(length, lengths, dim):
        x = rng.normal(size=(n, length, dim)).astype(np.float32)
        x[np.arange(length)[None, :] >= lengths[:, None]] = 0
        return x
    bert = np.zeros((n, 3, lt), dtype=np.float32)
    bert[:, 1] = np.arange(lt)[None, :] < text_len[:, None]
    part = {
        "id": [f"video_{seed:04d}$_${i:04d}" for i in range(n)],
        "raw_text": [f"clip {i}" for i in range(n)],
        "text": padded(lt, text_len, dims[0]), "text_bert": bert,
        "audio": padded(la, audio_len, dims[1]), "vision": padded(lv, vision_len, dims[2]),
        "audio_lengths": audio_len.tolist(), "vision_lengths": vision_len.tolist(),
        "regression_labels": (rng.uniform(-1, 1, n) * scale).astype(np.float32),
    }
    if unimodal:
        for k in "TAV":
            part[f"regression_labels_{k}"] = (rng.uniform(-1, 1, n) * scale).astype(np.float32)
    return part


def make_labeled(**kw) -> dict:
    return {s: make_split(seed=i, **kw) for i, s in enumerate(("train", "valid", "test"))}


def write_pickle(path, obj):
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=4)
    return path
