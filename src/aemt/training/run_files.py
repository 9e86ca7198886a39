"""The files of a run directory: writing them atomically, and reading them back safely.

A run directory holds ``config.yaml`` (the resolved config), ``run.json`` (feature dims and
preprocessing), ``preprocess.npz`` (standardisation statistics), ``checkpoints/last.ckpt`` and
``checkpoints/best.ckpt``, ``metrics.csv`` (one row per epoch), ``model.pt`` (the best weights).
Every file is written atomically; weights and checkpoints are read with
``torch.load(weights_only=True)``, and a file that is damaged, foreign or made for another model
gives one :class:`~aemt.errors.RunError` naming it.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from aemt.config import Config, save_config
from aemt.data.mmsa import MODALITIES
from aemt.data.pooling import stats_from_arrays, stats_to_arrays
from aemt.errors import RunError
from aemt.io_utils import atomic_write_bytes, atomic_write_text

# what Lightning reads from a checkpoint to resume a run
_CHECKPOINT_KEYS = {"pytorch-lightning_version": str, "epoch": int, "global_step": int, "state_dict": dict,
                    "optimizer_states": list, "lr_schedulers": list}


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temp file and renamed; read back with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """The checkpoint at ``path``; one that is damaged, unsafe or lacks what Lightning reads to
        resume is a :class:`RunError` naming the file."""
        path = Path(path)
        checkpoint = _torch_load(path, "checkpoint", map_location or "cpu")
        if not isinstance(checkpoint, dict):
            raise RunError(f"'{path}' holds a {type(checkpoint).__name__}; expected a Lightning checkpoint (a dict)")
        for key, kind in _CHECKPOINT_KEYS.items():
            if not isinstance(checkpoint.get(key), kind):
                problem = f"got a {type(checkpoint[key]).__name__}" if key in checkpoint else "missing"
                raise RunError(f"'{path}' is not a checkpoint of an aemt run: key '{key}' (a {kind.__name__}): "
                               f"{problem}")
        _tensor_dict(checkpoint["state_dict"], path, "state_dict")
        return checkpoint


def checkpoint_epoch(path: Path) -> int:
    """The epoch (0-based) after which the checkpoint at ``path`` was saved."""
    return int(SafeCheckpointIO().load_checkpoint(path)["epoch"])


def save_state_dict(module: torch.nn.Module, path: Path) -> None:
    """Save a module's weights atomically."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _torch_load(path: Path, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; any failure is one :class:`RunError` naming the file
    (torch raises a dozen kinds: UnpicklingError, RuntimeError, EOFError, KeyError...)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        text = " ".join(str(exc).split())
        found = re.search(r"GLOBAL ([\w.]+)", text, re.IGNORECASE)
        if isinstance(exc, pickle.UnpicklingError):  # torch's own text would advise an unsafe load
            why = (f"it holds code or objects ({found.group(1)}) besides tensors; aemt never runs those" if found
                   else "not a file torch.save wrote, or damaged: its pickle cannot be read")
        else:
            detail = f"{text[:120]}..." if len(text) > 120 else text or "empty or cut short"
            why = f"not one torch.save wrote, or damaged: {type(exc).__name__}: {detail}"
        raise RunError(f"'{path}' is not a readable aemt {what} file ({why})") from None


def _tensor_dict(state: Any, path: Path, within: str = "") -> dict[str, torch.Tensor]:
    """``state`` read from ``path``, checked to be a non-empty state dict (names to tensors)."""
    where = f" under key '{within}'" if within else ""
    if not isinstance(state, dict):
        raise RunError(f"'{path}' holds a {type(state).__name__}{where}; expected a state dict (names to tensors)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise RunError(f"'{path}'{where}: key {key!r} holds a {type(value).__name__}; expected a tensor")
    if not state:
        raise RunError(f"'{path}' holds no weights{where}")
    return state


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict (or the ``state_dict`` of a Lightning checkpoint) safely; a file that
    is not one is a :class:`RunError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"weights file not found: '{path}'")
    state = _torch_load(path, "weights")
    if isinstance(state, dict) and "state_dict" in state:  # Lightning checkpoint: strip the module prefix
        state = _tensor_dict(state["state_dict"], path, "state_dict")
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    state = _tensor_dict(state, path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise RunError(f"'{path}': weights {_first_few(bad)} hold non-finite values (NaN or inf): the run that "
                       "wrote them diverged (a lower learning rate may help), or the file is damaged")
    return state


def _first_few(keys: list[str], shown: int = 3) -> str:
    return ", ".join(map(repr, keys[:shown])) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def weight_mismatches(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """Why ``state`` does not load into a module whose state dict is ``expected`` (missing and
    unexpected keys, the first few; tensors of another shape); ``""`` when it fits."""
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    shapes = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    parts = [f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''} ({_first_few(keys)})"
             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    parts += [f"key '{k}': expected shape {tuple(expected[k].shape)}, got {tuple(state[k].shape)}" for k in shapes[:3]]
    if len(shapes) > 3:
        parts.append(f"{len(shapes) - 3} more shape mismatches")
    return "; ".join(parts)


def write_run_info(run_dir: Path, cfg: Config, info: dict[str, Any], stats: dict | None) -> None:
    """Write ``config.yaml``, ``run.json`` and ``preprocess.npz`` of a run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=2))
    buffer = io.BytesIO()
    np.savez(buffer, **stats_to_arrays(stats or {}))
    atomic_write_bytes(run_dir / "preprocess.npz", buffer.getvalue())


# run.json keys the run's users need: what the weights' shapes and the preprocessing follow
RUN_KEYS = {"stage": str, "dims": dict, "seq_len": int, "text_input": str}


def read_run_info(run_dir: Path) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]] | None]:
    """Read ``run.json`` and the standardisation statistics of a run directory, each checked;
    a damaged file is a :class:`RunError` naming it and the key."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise RunError(f"'{run_dir}' is not an aemt run directory (no run.json)")
    info = _read_run_json(run_dir / "run.json")
    return info, _read_stats(run_dir / "preprocess.npz", info["dims"])


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object a run wrote (``run.json``, ``test_metrics.json``), or one :class:`RunError`
    naming the file when it is missing, unreadable or not an object."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunError(f"'{path}' is not readable JSON ({exc})") from None
    if not isinstance(info, dict):
        raise RunError(f"'{path}': expected a JSON object, got {type(info).__name__}")
    return info


def read_test_metrics(path: Path) -> dict[str, Any]:
    """A run's ``test_metrics.json``; a metric written as ``null`` (undefined, e.g. the correlation of
    constant predictions) reads as NaN."""
    return {k: float("nan") if v is None else v for k, v in read_json(path).items()}


def _read_run_json(path: Path) -> dict[str, Any]:
    info = read_json(path)
    for key, kind in RUN_KEYS.items():
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise RunError(f"'{path}', key '{key}': " + (f"expected a {kind.__name__}, got {info[key]!r}" if key in info
                                                         else "missing"))
    if info["seq_len"] < 1 or info["text_input"] not in ("sequence", "cls"):
        raise RunError(f"'{path}': expected seq_len >= 1 and text_input 'sequence' or 'cls', got "
                       f"{info['seq_len']!r} and {info['text_input']!r}")
    if sorted(info["dims"]) != sorted(MODALITIES) or not all(type(d) is int and d > 0 for d in info["dims"].values()):
        raise RunError(f"'{path}', key 'dims': expected a positive feature width for each of {list(MODALITIES)}, "
                       f"got {info['dims']!r}")
    return info


def _read_stats(path: Path, dims: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Per-modality (mean, std) of ``preprocess.npz``, checked against the run's widths ``dims``;
    None for a run without standardisation (no arrays)."""
    if not path.is_file():
        raise RunError(f"'{path}' not found: the run directory is incomplete")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("one array, not an .npz archive of arrays")
        with npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise RunError(f"'{path}' is not a readable .npz archive of standardisation statistics "
                       f"({type(exc).__name__}: {str(exc).split('. ')[0]})") from None
    if not arrays:
        return None
    for key, width in ((f"{m}_{part}", dims[m]) for m in MODALITIES for part in ("mean", "std")):
        problem = _stats_problem(arrays.get(key), width, key)
        if problem:
            raise RunError(f"'{path}', key '{key}': {problem}")
    return stats_from_arrays(arrays, MODALITIES)


def _stats_problem(a: np.ndarray | None, width: int, key: str) -> str:
    """What is wrong with the array ``key`` of ``preprocess.npz``; ``""`` when nothing."""
    if a is None:
        return "missing (expected a mean and a std per modality)"
    if a.shape != (width,) or a.dtype.kind not in "iuf":
        return (f"expected shape ({width},) of numbers (the run's width, run.json 'dims'), "
                f"got shape {a.shape} of {a.dtype}")
    if not np.isfinite(a).all():
        return f"expected finite values, got {int((~np.isfinite(a)).sum())} NaN or inf of {a.size}"
    if key.endswith("_std") and a.min() <= 0:
        return f"expected positive values, got {a.min():g}"
    return ""


def save_best_model(model: torch.nn.Module, run_dir: Path, cfg: Config, info: dict[str, Any],
                    stats: dict | None, epochs_run: int, fit_seconds: float) -> None:
    """End of a stage: load the best checkpoint's weights into ``model``, save them as ``model.pt``
    and record the epochs and fit time in ``run.json``."""
    model.load_state_dict(load_weights(best_checkpoint(run_dir)))
    save_state_dict(model, run_dir / "model.pt")
    info.update(epochs_run=epochs_run, fit_seconds=round(fit_seconds, 2))
    write_run_info(run_dir, cfg, info, stats)


def best_checkpoint(run_dir: Path) -> Path:
    """Path of the best checkpoint of a run (falls back to last)."""
    for name in ("best.ckpt", "last.ckpt"):
        path = Path(run_dir) / "checkpoints" / name
        if path.is_file():
            return path
    raise RunError(f"no checkpoint found in '{Path(run_dir) / 'checkpoints'}'")
