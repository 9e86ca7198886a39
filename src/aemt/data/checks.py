"""Checks of one value read from an MMSA file, each failing with one :class:`~aemt.errors.DataError`
that names the file, split and key and says what was expected and what the file holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aemt.errors import DataError


def err(msg: str, file: Path, split: str | None = None, key: str | None = None) -> DataError:
    """The :class:`DataError` of ``msg`` at ``file``, ``split``, ``key``."""
    return DataError(msg, file=str(file), split=split, key=key)


def as_array(value: Any, file: Path, split: str, key: str) -> np.ndarray:
    """``value`` as a numpy array, or an error saying why it is none."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise err(f"cannot be read as an array ({exc})", file, split, key) from None


def check_rank(arr: np.ndarray, rank: int, file: Path, split: str, key: str, what: str) -> None:
    """Refuse an array of another rank than ``rank`` (``what``: its expected layout)."""
    if arr.ndim != rank:
        raise err(f"expected rank {rank} ({what}), got shape {tuple(arr.shape)}", file, split, key)


def check_n(n: int, actual: int, file: Path, split: str, key: str, ref_key: str) -> None:
    """Refuse ``actual`` entries where ``ref_key`` has ``n`` clips."""
    if actual != n:
        raise err(f"expected {n} entries (as in '{ref_key}'), got {actual}", file, split, key)


def check_real(arr: np.ndarray, file: Path, split: str, key: str, what: str, allow_bool: bool = True) -> None:
    """Refuse strings, objects and complex numbers (whose imaginary part a cast would drop), and
    booleans where a number is meant (``allow_bool=False``: features, labels)."""
    if arr.dtype.kind not in ("biuf" if allow_bool else "iuf"):
        raise err(f"expected real numbers ({what}), got dtype {arr.dtype}", file, split, key)


def shown(value: Any) -> str:
    """A number as written in the file: 10 for 10.0, 1e+20 (never an overflowed integer), nan."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:g}"
    return str(value)


def first_bad(bad: np.ndarray) -> tuple[int, ...]:
    """The index of the first True of ``bad``."""
    return tuple(int(i) for i in np.argwhere(bad)[0])


def float_features(arr: np.ndarray, file: Path, split: str, key: str) -> tuple[np.ndarray, int]:
    """Return float32 features with -inf/+inf/NaN replaced by 0, and how many were replaced."""
    check_real(arr, file, split, key, "features", allow_bool=False)
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    count = int(bad.sum())
    if count == arr.size:
        raise err(f"expected finite feature values, got {count} non-finite of {count} (all of them)", file, split, key)
    if count:
        if not arr.flags.writeable:
            arr = arr.copy()
        arr[bad] = 0.0
    return arr, count


def column(arr: np.ndarray) -> np.ndarray:
    """(N, 1) as (N,): some exports store labels and masks that way."""
    return arr[:, 0] if arr.ndim == 2 and arr.shape[1] == 1 else arr
