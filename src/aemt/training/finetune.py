"""Stage 2 recipe: fine-tune AE-MT on labeled clips (paper §3.3).

``L_ft = L_senti + λ2 · L_con`` (eq. 19). The strong positives of eq. 16 are dropout-masked
copies of the inputs. With ``finetune.sp_stop_grad: false`` they run through the model in the
same forward pass as the clips (the batch is doubled; equivalent to a second pass since no layer
mixes clips) and gradients flow through both views. With ``true`` (default) the strong positive
is a fixed target computed without gradients, a pass that costs about a third of a training
step (the paper does not say whether gradients flow through the positive).
With ``finetune.pretrained: none`` and ``lambda2: 0`` this is plain MulT, the baseline.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lightning as L
import torch

from aemt.config import Config, load_config
from aemt.data.batches import masks_from_lengths
from aemt.data.dataset import load_labeled
from aemt.data.mmsa import MODALITIES
from aemt.errors import ConfigError, RunError
from aemt.models import AEMT
from aemt.models.compat import upgrade_state_dict
from aemt.models.layers import dropout
from aemt.training.common import StageModule, build_trainer, check_devices, quiet_lightning, stage_loaders
from aemt.training.losses import contrastive_loss, sentiment_loss
from aemt.training.resume import check_resumable, fit, resume_checkpoint
from aemt.training.run_files import (load_weights, read_json, read_run_info, save_best_model, weight_mismatches,
                                     write_run_info)

# model keys that must agree between a pre-training run and the fine-tuning config
ENCODER_KEYS = ("d_model", "num_heads", "encoder_layers", "conv_kernels", "autoencoder", "conv_padding",
                "position_embeddings")


@contextmanager
def model_dropout(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block the model's own dropout is on (``enabled``) or off (eval mode)."""
    was_training = model.training
    model.train(enabled)
    try:
        yield
    finally:
        model.train(was_training)


class FinetuneModule(StageModule):
    """Lightning wrapper of :class:`AEMT` with the loss of eq. 19."""

    def __init__(self, dims: dict[str, int], cfg: Config) -> None:
        super().__init__(AEMT(dims, cfg.model), cfg, "finetune")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        f = self.cfg.finetune
        x, masks, labels = {m: batch[m] for m in MODALITIES}, masks_from_lengths(batch), batch["label"]
        n = labels.shape[0]
        if f.lambda2 > 0:
            x_sp = {m: dropout(x[m], f.sp_dropout) for m in MODALITIES}  # eq. 16
            if f.sp_stop_grad:  # the strong positive is a fixed target: a cheap no-grad pass
                out = self.forward_fn(x, masks)
                with torch.no_grad(), model_dropout(self.model, f.sp_model_dropout):
                    z_sp = self.forward_fn(x_sp, masks).representation
                prediction, z = out.prediction, out.representation
            else:  # gradients through both views: one forward over the doubled batch
                out = self.forward_fn({m: torch.cat([x[m], x_sp[m]]) for m in MODALITIES},
                                      {m: torch.cat([masks[m], masks[m]]) for m in MODALITIES})
                prediction, z, z_sp = out.prediction[:n], out.representation[:n], out.representation[n:]
            l_con = contrastive_loss(z, z_sp, labels, f.tau, f.neutral_band)  # eq. 17-18
        else:
            out = self.forward_fn(x, masks)
            prediction, l_con = out.prediction, torch.zeros((), device=labels.device)
        l_senti = sentiment_loss(prediction, labels[:, 0])  # eq. 15
        loss = l_senti + f.lambda2 * l_con  # eq. 19
        self.log_epoch_means("train", {"loss": loss, "senti": l_senti, "con": l_con}, n, batch_idx)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.forward_fn({m: batch[m] for m in MODALITIES}, masks_from_lengths(batch))
        label = batch["label"][:, 0]
        loss = sentiment_loss(out.prediction, label)  # early stopping and model selection on L_senti
        self.log_epoch_means("val", {"loss": loss, "mae": (out.prediction.float() - label).abs().mean()},
                             label.shape[0], batch_idx)
        return loss


def load_pretrained(model: AEMT, cfg: Config, pretrained_dir: Path, dims: dict[str, int]) -> list[str]:
    """Copy the encoders E_m of a pre-training run into ``model``; check the shapes agree."""
    info, _ = read_run_info(pretrained_dir)
    if info["stage"] != "pretrain":
        raise RunError(f"--pretrained '{pretrained_dir}' is not a pre-training run (stage={info['stage']!r})")
    if info["dims"] != dims:
        raise RunError(f"--pretrained '{pretrained_dir}': feature dims {info['dims']} differ from the data's {dims}")
    pre_cfg = load_config(pretrained_dir / "config.yaml")
    for key, want, got in (("data.seq_len", info["seq_len"], cfg.data.seq_len),
                           ("data.text_input", info["text_input"], cfg.data.text_input),
                           ("data.standardize", pre_cfg.data.standardize, cfg.data.standardize)):
        if want != got:
            raise RunError(f"config key '{key}': the pre-training run used {want!r}, this config has {got!r}")
    for key in ENCODER_KEYS:
        want, got = getattr(pre_cfg.model, key), getattr(cfg.model, key)
        if want != got:
            raise RunError(f"config key 'model.{key}': the pre-training run used {want!r}, this config has {got!r}")
    try:
        state = load_weights(pretrained_dir / "model.pt")
    except RunError as exc:  # say which option named the file
        raise RunError(f"--pretrained '{pretrained_dir}' (the pre-training run): {exc}") from None
    try:
        return model.load_pretrained_encoders(state)
    except KeyError:
        raise RunError(f"--pretrained '{pretrained_dir}': model.pt holds no encoder weights (keys 'encoders.*'); "
                       "expected the model.pt of an aemt pre-training run") from None
    except RuntimeError:  # the encoders' keys or shapes differ: say which
        expected = {f"encoders.{k}": v for k, v in model.encoders.state_dict().items()}
        found = {k: v for k, v in upgrade_state_dict(state, expected).items() if k.startswith("encoders.")}
        raise RunError(f"--pretrained '{pretrained_dir}': model.pt does not hold this model's encoders "
                       f"({weight_mismatches(found, expected)})") from None


def finetune(cfg: Config, data_path: str | Path, out_dir: str | Path, pretrained_dir: str | Path | None = None,
             resume: bool = False) -> dict[str, float]:
    """Fine-tune on ``data_path`` (train/valid), test on its test split; return the test metrics.

    ``pretrained_dir``: a pre-training run whose encoders initialise the model (ignored when
    ``finetune.pretrained`` is ``none``; a path in ``finetune.pretrained`` is used when no
    ``pretrained_dir`` is given). Writes ``test_metrics.json`` and ``predictions.csv``. Under
    DDP, rank 0 writes them and returns the metrics; the other ranks return ``{}`` once it has.
    """
    from aemt.evaluation.predict import checked_predictions, write_predictions, write_test_metrics

    quiet_lightning()
    out_dir = Path(out_dir)
    check_devices(cfg)
    if cfg.finetune.pretrained == "none" and pretrained_dir is not None:
        raise ConfigError(f"--pretrained '{pretrained_dir}' was given, but finetune.pretrained is 'none' (train "
                          "from scratch, the MulT baseline); give one or the other")
    ckpt = resume_checkpoint(out_dir, resume)
    L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    d, f = cfg.data, cfg.finetune
    data = load_labeled(data_path, seq_len=d.seq_len, text_input=d.text_input, standardize_features=d.standardize,
                        metrics=d.metrics, cache_dir=d.cache_dir)
    if f.pretrained == "none":
        pretrained_dir = None
    elif pretrained_dir is None and f.pretrained != "auto":
        pretrained_dir = f.pretrained
    module = FinetuneModule(data.dims, cfg)
    loaded = load_pretrained(module.model, cfg, Path(pretrained_dir), data.dims) if pretrained_dir else []
    # resuming without --pretrained: the weights come from the checkpoint; keep the record of where
    # the encoders first came from
    record = out_dir / "run.json"
    origin = read_json(record) if ckpt and not pretrained_dir and record.is_file() else {}
    info = {"stage": "finetune", "dims": data.dims, "seq_len": d.seq_len, "text_input": d.text_input,
            "metrics": d.metrics, "data": str(Path(data_path).resolve()),
            "pretrained": str(Path(pretrained_dir).resolve()) if pretrained_dir else origin.get("pretrained"),
            "pretrained_tensors": len(loaded) if pretrained_dir else origin.get("pretrained_tensors", 0),
            "unimodal_from_multimodal": data.unimodal_from_multimodal}
    if ckpt:
        check_resumable(out_dir, cfg, info, data.stats, ckpt, f.epochs)
    write_run_info(out_dir, cfg, info, data.stats)
    trainer = build_trainer(cfg, out_dir, f.epochs, f.patience)
    train, valid = stage_loaders(cfg, data["train"], data["valid"], f.batch_size)
    start = time.perf_counter()
    fit(trainer, module, (train, valid), ckpt, out_dir)
    metrics: dict[str, float] = {}
    try:
        if trainer.is_global_zero:
            save_best_model(module.model, out_dir, cfg, info, data.stats, trainer.current_epoch,
                            time.perf_counter() - start)
            predictions = checked_predictions(module.model, data["test"], out_dir, batch_size=max(f.batch_size, 64))
            write_predictions(out_dir / "predictions.csv", data["test"], predictions)
            metrics = write_test_metrics(out_dir / "test_metrics.json", data["test"], predictions, d.metrics)
    finally:  # under DDP the other ranks return once rank 0 has written the run's files (or failed)
        trainer.strategy.barrier("finetune_saved")
    return metrics
