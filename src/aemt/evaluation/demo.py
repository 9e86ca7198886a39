"""``aemt demo``: the whole method on the embedded synthetic default, with the MulT baseline.

Steps (each skipped when its result is already in ``out``, made with the same settings): synthetic CH-SIMS-v2-like data →
pre-training → AE-MT fine-tuning → MulT baseline (no encoders, no pre-training, λ2 = 0) → metrics side by side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from aemt.config import Config, load_config
from aemt.errors import RunError
from aemt.evaluation.experiment import VARIANTS
from aemt.io_utils import atomic_write_text, json_text
from aemt.training.resume import EXECUTION_KEYS, config_differences, last_checkpoint
from aemt.training.run_files import read_test_metrics


def run_demo(out: str | Path, seed: int = 1111, pretrain_epochs: int | None = None,
             finetune_epochs: int | None = None, log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Run the demo into ``out``; return ``{"AE-MT": metrics, "MulT": metrics}``."""
    from aemt.data.synthetic import write_synthetic
    from aemt.training.finetune import finetune
    from aemt.training.pretrain import pretrain

    out = Path(out)
    overrides = {"trainer.seed": seed}
    if pretrain_epochs is not None:  # 0 too: the config refuses it
        overrides["pretrain.epochs"] = pretrain_epochs
    if finetune_epochs is not None:
        overrides["finetune.epochs"] = finetune_epochs
    cfg = load_config("synthetic", overrides)
    runs = {  # name: (folder, config, pre-training run)
        "AE-MT": (out / "aemt", cfg, out / "pretrain"),
        "MulT": (out / "mult", load_config("synthetic", {**overrides, **VARIANTS["mult"]}), None),
    }
    for run_dir, run_cfg in ((out / "pretrain", cfg), *((d, c) for d, c, _ in runs.values())):
        _check_same_settings(run_dir, run_cfg, out)
    labeled, unlabeled = out / "data" / "labeled.pkl", out / "data" / "unlabeled.pkl"
    if not (labeled.is_file() and unlabeled.is_file()):
        log("[1/4] writing synthetic data (sims2 preset, small scale)")
        write_synthetic(out / "data", preset="sims2", scale="small", seed=0)
    timings = _earlier_timings(out / "summary.json")  # of the steps a rerun skips
    start = time.perf_counter()
    if not (out / "pretrain" / "model.pt").is_file():
        log(f"[2/4] pre-training autoencoders ({cfg.pretrain.epochs} epochs)")
        pretrain(cfg, unlabeled, out / "pretrain", resume=last_checkpoint(out / "pretrain").is_file())
        timings["pretrain_s"] = round(time.perf_counter() - start, 1)
    rows = {}
    for step, (name, (run_dir, vcfg, pre)) in enumerate(runs.items(), start=3):
        start = time.perf_counter()
        if not (run_dir / "test_metrics.json").is_file():
            log(f"[{step}/4] fine-tuning {name} ({vcfg.finetune.epochs} epochs)")
            finetune(vcfg, labeled, run_dir, pretrained_dir=pre, resume=last_checkpoint(run_dir).is_file())
            timings[f"{run_dir.name}_s"] = round(time.perf_counter() - start, 1)
        rows[name] = read_test_metrics(run_dir / "test_metrics.json")
    atomic_write_text(out / "summary.json", json_text({"test_metrics": rows, "seconds": timings}, indent=2))
    return rows


def _earlier_timings(path: Path) -> dict[str, float]:
    """The step times a previous run of the demo recorded in ``path`` (none when it is missing or damaged)."""
    try:
        seconds = json.loads(path.read_text()).get("seconds", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v in seconds.items() if isinstance(v, (int, float))} if isinstance(seconds, dict) else {}


def _check_same_settings(run_dir: Path, cfg: Config, out: Path) -> None:
    """A run already in ``run_dir`` (finished or not) is reused only if it has the demo's settings."""
    changes = config_differences(run_dir, cfg, EXECUTION_KEYS)
    if changes:
        raise RunError(f"'{run_dir}' holds a demo run with other settings ({'; '.join(changes)}); "
                       f"choose another --out than '{out}' or delete it")
