"""Run by tests/test_ddp.py: a short fine-tuning run (``aemt.training.finetune.finetune``) with
Lightning DDP on two CPU processes (gloo). Lightning re-launches this script for rank 1; each rank
saves its final weights and, once ``finetune`` returns, what it returned and found on disk."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from aemt.config import load_config
from aemt.training import finetune as finetune_mod


class SaveWeights(Callback):
    rank = -1

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, module) -> None:
        SaveWeights.rank = trainer.global_rank
        self.initial = {k: v.clone() for k, v in module.model.state_dict().items()}

    def on_train_end(self, trainer, module) -> None:
        torch.save(module.model.state_dict(), self.out / f"rank{trainer.global_rank}.pt")
        if trainer.global_rank == 0:
            torch.save(self.initial, self.out / "initial.pt")


def main(out: Path, labeled: Path) -> None:
    cfg = load_config("synthetic", {
        "model.d_model": 8, "model.num_heads": 2, "model.encoder_layers": 1, "model.decoder_layers": 1,
        "model.cross_layers": 1, "model.self_layers": 1, "data.seq_len": 8, "finetune.epochs": 2,
        "finetune.batch_size": 8, "finetune.pretrained": "none", "trainer.accelerator": "cpu",
        "trainer.devices": 2, "trainer.strategy": "ddp", "trainer.progress": False, "trainer.seed": 3})
    build_trainer = finetune_mod.build_trainer
    finetune_mod.build_trainer = lambda *a, **k: build_trainer(*a, **k, extra_callbacks=[SaveWeights(out)])
    metrics = finetune_mod.finetune(cfg, labeled, out / "run")
    run_files = [out / "run" / name for name in ("model.pt", "predictions.csv", "test_metrics.json")]
    (out / f"rank{SaveWeights.rank}.json").write_text(json.dumps(
        {"returned_metrics": bool(metrics), "run_files_exist": all(p.is_file() for p in run_files)}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
