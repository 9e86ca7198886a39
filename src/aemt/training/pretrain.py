"""Stage 1 recipe: pre-train the per-modality autoencoders on unlabeled clips (paper §3.2).

``L_ae = L_recon + λ1 · L_consistency`` (eq. 10), with tampering of eq. 6 done on the batch.
Read top to bottom: load data → build model → fit with Lightning → save the best weights.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from aemt.config import Config
from aemt.data.batches import masks_from_lengths
from aemt.data.dataset import load_unlabeled
from aemt.data.mmsa import MODALITIES
from aemt.data.tampering import tamper_batch
from aemt.models import PretrainModel
from aemt.training.common import StageModule, build_trainer, check_devices, quiet_lightning, stage_loaders
from aemt.training.losses import consistency_loss, reconstruction_loss
from aemt.training.resume import check_resumable, fit, resume_checkpoint
from aemt.training.run_files import save_best_model, write_run_info


class PretrainModule(StageModule):
    """Lightning wrapper of :class:`PretrainModel` with the loss of eq. 10."""

    def __init__(self, dims: dict[str, int], cfg: Config) -> None:
        super().__init__(PretrainModel(dims, cfg.model), cfg, "pretrain")

    def _step(self, batch: dict[str, torch.Tensor], batch_idx: int, stage: str,
              generator: torch.Generator | None) -> torch.Tensor:
        x = {m: batch[m] for m in MODALITIES}
        masks = masks_from_lengths(batch)
        x_tam, masks_tam, y_tamper, _, _ = tamper_batch(x, masks, self.cfg.pretrain.p_tamper, generator)  # eq. 6
        out = self.forward_fn(x_tam, masks_tam)
        l_recon = reconstruction_loss(out.recon, x_tam, masks_tam)  # eq. 5 (each AE rebuilds its own input)
        l_cons = consistency_loss(out.tamper_logit, y_tamper)  # eq. 9
        loss = l_recon + self.cfg.pretrain.lambda1 * l_cons  # eq. 10
        acc = ((out.tamper_logit > 0).float() == y_tamper).float().mean()
        n = x["text"].shape[0]
        self.log_epoch_means(stage, {"loss": loss, "recon": l_recon, "consistency": l_cons, "tamper_acc": acc},
                             n, batch_idx)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, batch_idx, "train", None)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # the same tampering every epoch, so validation losses are comparable
        generator = torch.Generator().manual_seed(self.cfg.trainer.seed + batch_idx)
        return self._step(batch, batch_idx, "val", generator)


def pretrain(cfg: Config, data_path: str | Path, out_dir: str | Path, resume: bool = False) -> Path:
    """Pre-train autoencoders on the unlabeled clips of ``data_path``; return the run directory.

    ``data_path`` is an unlabeled file (or a labeled file with a ``train_mix`` split). The run
    directory receives ``model.pt`` (best :class:`PretrainModel` weights) among the usual files.
    """
    quiet_lightning()
    out_dir = Path(out_dir)
    check_devices(cfg)
    ckpt = resume_checkpoint(out_dir, resume)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    d = cfg.data
    data = load_unlabeled(data_path, seq_len=d.seq_len, text_input=d.text_input, standardize_features=d.standardize,
                          valid_fraction=cfg.pretrain.valid_fraction, seed=cfg.trainer.seed, cache_dir=d.cache_dir)
    info = {"stage": "pretrain", "dims": data.dims, "seq_len": d.seq_len, "text_input": d.text_input,
            "data": str(Path(data_path).resolve()), "n_train": data["train"].n, "n_valid": data["valid"].n}
    if ckpt:
        check_resumable(out_dir, cfg, info, data.stats, ckpt, cfg.pretrain.epochs)
    write_run_info(out_dir, cfg, info, data.stats)
    module = PretrainModule(data.dims, cfg)
    trainer = build_trainer(cfg, out_dir, cfg.pretrain.epochs, cfg.pretrain.patience)
    train, valid = stage_loaders(cfg, data["train"], data["valid"], cfg.pretrain.batch_size)
    start = time.perf_counter()
    fit(trainer, module, (train, valid), ckpt, out_dir)
    try:
        if trainer.is_global_zero:
            save_best_model(module.model, out_dir, cfg, info, data.stats, trainer.current_epoch,
                            time.perf_counter() - start)
    finally:  # under DDP the other ranks return once rank 0 has written model.pt (or failed)
        trainer.strategy.barrier("pretrain_saved")
    return out_dir
