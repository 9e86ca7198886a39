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

from aemt.config import Config, load_config
from aemt.errors import RunError, TrainingInterrupted
from aemt.training.run_files import RUN_KEYS, read_json

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
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise RunError(f"--out '{run_dir}' is an existing file; expected a run folder (new or to resume)")
    last = last_checkpoint(run_dir)
    if resume:
        if not last.is_file():
            raise RunError(f"--resume: no checkpoint to resume from at '{last}'")
        return str(last)
    if last.is_file():
        raise RunError(f"'{run_dir}' already holds a run; pass --resume to continue it or choose another --out")
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


def check_resumable(run_dir: Path, cfg: Config, info: dict[str, Any]) -> None:
    """Refuse to resume ``run_dir`` with a config or data its weights were not trained for
    (``info``: the new data's description, as the run's ``run.json`` holds it)."""
    record = Path(run_dir) / "run.json"
    saved_info = read_json(record) if record.is_file() else {}
    changes = config_differences(run_dir, cfg, STOPPING_KEYS | EXECUTION_KEYS)
    changes += [f"{key} of the data: {saved_info.get(key)!r} -> {info.get(key)!r}" for key in RUN_KEYS
                if key in saved_info and saved_info.get(key) != info.get(key)]
    if changes:
        raise RunError(f"--resume: '{run_dir}' was trained with other settings ({'; '.join(changes)}); a resumed "
                       "run may change only its epochs, patience and device settings. Start a new run with another --out")


def fit(trainer: L.Trainer, module: L.LightningModule, loaders: tuple[Any, Any], ckpt: str | None,
        run_dir: Path) -> None:
    """``trainer.fit``, with Lightning's silent exit on Ctrl-C turned into :class:`TrainingInterrupted`."""
    try:
        trainer.fit(module, *loaders, ckpt_path=ckpt)
    except SystemExit:
        if not trainer.interrupted:
            raise
        last = last_checkpoint(run_dir)
        then = (f"its last finished epoch is saved in '{last}': continue it with --resume (an experiment: "
                "run it again)") if last.is_file() else "no epoch had finished: start it again"
        raise TrainingInterrupted(f"training of '{run_dir}' interrupted in epoch {trainer.current_epoch + 1}; "
                                  f"{then}") from None
