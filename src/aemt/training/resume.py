"""Resuming a run: which checkpoint, whether the new settings still describe the same run, and
one clear message when training is interrupted.

A run resumes from ``checkpoints/last.ckpt``, written after every epoch. Its weights only fit the
model, data widths and hyper-parameters it was trained with, so a resumed run may change only how
long it trains (:data:`STOPPING_KEYS`) and where and how fast it runs (:data:`EXECUTION_KEYS`);
anything else is refused before the run's files are touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from aemt.config import Config, load_config
from aemt.errors import RunError, TrainingInterrupted
from aemt.io_utils import require_folder_path
from aemt.training.run_files import RUN_KEYS, checkpoint_epoch, read_run_info

STOPPING_KEYS = frozenset({"pretrain.epochs", "pretrain.patience", "finetune.epochs", "finetune.patience"})
EXECUTION_KEYS = frozenset({
    "name", "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.precision", "trainer.compile", "trainer.compile_mode", "trainer.compile_scope",
    "trainer.compile_backend", "trainer.deterministic", "trainer.progress", "data.cache_dir",
    "data.device_resident",
})


def last_checkpoint(run_dir: Path) -> Path:
    """Where a run keeps the checkpoint of its last finished epoch."""
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def resume_checkpoint(run_dir: Path, resume: bool) -> str | None:
    """The ``last.ckpt`` to resume from, or None for a fresh run."""
    require_folder_path(Path(run_dir), "--out", "a run folder (new or to resume)")
    last = last_checkpoint(run_dir)
    if resume:
        if not last.is_file():
            raise RunError(f"--resume: no checkpoint to resume from at '{last}'")
        return str(last)
    if last.is_file():
        raise RunError(f"'{run_dir}' already holds a run; pass --resume (from Python: resume=True) to continue it "
                       "or choose another --out")
    return None


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(run_dir: Path, cfg: Config, allowed: frozenset[str] = frozenset()) -> list[str]:
    """``key: run's value -> cfg's value`` for every config key (outside ``allowed``) on which
    ``cfg`` differs from the ``config.yaml`` saved in ``run_dir``; empty when the run has none."""
    saved_path = Path(run_dir) / "config.yaml"
    if not saved_path.is_file():
        return []
    saved, new = _flat(load_config(saved_path).to_dict()), _flat(cfg.to_dict())
    return [f"{key}: {saved.get(key)!r} -> {new.get(key)!r}" for key in sorted(saved.keys() | new.keys())
            if key not in allowed and saved.get(key) != new.get(key)]


def check_resumable(run_dir: Path, cfg: Config, info: dict[str, Any], stats: dict | None, ckpt: str,
                    epochs: int) -> None:
    """Refuse to resume ``run_dir`` from ``ckpt`` with a config or data its weights were not trained
    for, or for fewer ``epochs`` than it has already finished (``info``/``stats``: the new data's
    description and standardisation statistics, as the run's ``run.json``/``preprocess.npz`` hold them).

    The data must be the run's own: the same statistics (the file may have moved), or, without
    standardisation, the same file; and the same numbers of clips."""
    saved_info, saved_stats = read_run_info(run_dir) if (Path(run_dir) / "run.json").is_file() else ({}, None)
    changes = config_differences(run_dir, cfg, STOPPING_KEYS | EXECUTION_KEYS)
    changes += [f"{key} of the data: {saved_info.get(key)!r} -> {info.get(key)!r}"
                for key in (*RUN_KEYS, "n_train", "n_valid") if key in saved_info and saved_info.get(key) != info.get(key)]
    if saved_stats is not None and stats is not None:
        same_data = saved_stats.keys() == stats.keys() and all(
            np.array_equal(a, b) for m in stats for a, b in zip(saved_stats[m], stats[m]))
    else:
        same_data = saved_info.get("data", info.get("data")) == info.get("data")
    if not same_data:
        why = " (other clips: their standardisation statistics differ)" if stats is not None else ""
        changes.append(f"data: {saved_info.get('data')!r} -> {info.get('data')!r}{why}")
    if changes:
        raise RunError(f"--resume: '{run_dir}' was trained with other settings ({'; '.join(changes)}); a resumed "
                       "run may change only its epochs, patience and device settings. Start a new run with another --out")
    finished = checkpoint_epoch(Path(ckpt)) + 1
    if epochs < finished:
        raise RunError(f"--resume: '{run_dir}' has already finished {finished} epochs, more than the {epochs} asked "
                       f"for; ask for at least {finished} (--epochs)")


def fit(trainer: L.Trainer, module: L.LightningModule, loaders: tuple[Any, Any], ckpt: str | None,
        run_dir: Path) -> None:
    """``trainer.fit``, with Lightning's silent exit on Ctrl-C turned into :class:`TrainingInterrupted`."""
    module.shuffle_generator = getattr(loaders[0], "generator", None)  # kept in checkpoints (training/rng.py)
    try:
        trainer.fit(module, *loaders, ckpt_path=ckpt)
    except SystemExit:
        if not trainer.interrupted:
            raise
        last = last_checkpoint(run_dir)
        then = (f"its last finished epoch is saved in '{last}': continue it with --resume (from "
                "Python: resume=True; an experiment: run it again)") if last.is_file() else "no epoch had finished: start it again"
        raise TrainingInterrupted(f"training of '{run_dir}' interrupted in epoch {trainer.current_epoch + 1}; "
                                  f"{then}") from None
