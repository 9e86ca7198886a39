"""Run by tests/test_ddp.py: a few fine-tuning steps with Lightning DDP on two CPU processes
(gloo). Lightning re-launches this script for rank 1; each rank saves its final weights."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from aemt.config import load_config
from aemt.data.mmsa import Split
from aemt.training.common import build_trainer, quiet_lightning, stage_loaders
from aemt.training.finetune import FinetuneModule

DIMS = {"text": 6, "audio": 4, "vision": 5}


def _split(name: str, n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(name, {m: rng.normal(size=(n, 8, d)).astype(np.float32) for m, d in DIMS.items()},
                 {m: rng.integers(1, 9, n) for m in DIMS}, [f"{name}{i}" for i in range(n)], [""] * n,
                 {k: rng.uniform(-1, 1, n).astype(np.float32) for k in "MTAV"})


class SaveWeights(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, module) -> None:
        torch.save(module.model.state_dict(), self.out / f"rank{trainer.global_rank}.pt")
        if trainer.global_rank == 0:
            torch.save(self.initial, self.out / "initial.pt")

    def on_train_start(self, trainer, module) -> None:
        self.initial = {k: v.clone() for k, v in module.model.state_dict().items()}


def main(out: Path) -> None:
    quiet_lightning()
    cfg = load_config("synthetic", {
        "model.d_model": 8, "model.num_heads": 2, "model.encoder_layers": 1, "model.decoder_layers": 1,
        "model.cross_layers": 1, "model.self_layers": 1, "data.seq_len": 8, "finetune.epochs": 2,
        "finetune.batch_size": 8, "trainer.accelerator": "cpu", "trainer.devices": 2, "trainer.strategy": "ddp",
        "trainer.progress": False, "trainer.seed": 3})
    L.seed_everything(cfg.trainer.seed, verbose=False)
    module = FinetuneModule(DIMS, cfg)
    trainer = build_trainer(cfg, out / "run", cfg.finetune.epochs, patience=10, extra_callbacks=[SaveWeights(out)])
    trainer.fit(module, *stage_loaders(cfg, _split("train", 48, 0), _split("valid", 16, 1), 8))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
