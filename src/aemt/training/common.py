"""What both training stages share: the Lightning Trainer (devices, precision, checkpoints, early
stopping, per-epoch CSV), compilation, and the LightningModule base with its optimiser, schedule
and clipping. The run directory's files are in :mod:`aemt.training.run_files`."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from aemt.config import Config
from aemt.config_checks import COMPILE_BACKENDS
from aemt.data.batches import make_loader
from aemt.data.mmsa import Split
from aemt.errors import ConfigError, RunError
from aemt.io_utils import atomic_write_text
from aemt.models.compat import upgrade_state_dict
from aemt.models.layers import CrossBlock, DecoderBlock, EncoderBlock
from aemt.training import rng
from aemt.training.allocator import keep_freed_memory
from aemt.training.optim import adam
from aemt.training.run_files import SafeCheckpointIO, weight_mismatches


def uses_gpu(cfg: Config) -> bool:
    """Whether the run trains on CUDA GPUs (``trainer.accelerator`` and what this machine has)."""
    return cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def check_devices(cfg: Config) -> None:
    """Refuse GPU settings this machine cannot run, before a run writes anything."""
    t = cfg.trainer
    if t.accelerator not in ("gpu", "cuda"):
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not visible:
        raise ConfigError(f"trainer.accelerator: {t.accelerator!r} asks for a CUDA GPU, but torch {torch.__version__} "
                          "sees none here; use 'cpu' or 'auto' (--device)")
    if t.devices > visible:
        raise ConfigError(f"trainer.devices: {t.devices} GPUs asked for, {visible} visible here (per node)")


def resolve_precision(cfg: Config) -> str:
    """``"auto"`` precision: bf16 autocast on a GPU, float32 elsewhere."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if uses_gpu(cfg) else "32-true"


def stage_loaders(cfg: Config, train: Split, valid: Split, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """The shuffled training and the validation loader of a stage; on a GPU the splits stay in
    GPU memory as ``data.device_resident`` says."""
    resident = cfg.data.device_resident if uses_gpu(cfg) else "never"
    return (make_loader(train, batch_size, shuffle=True, seed=cfg.trainer.seed, device_resident=resident),
            make_loader(valid, batch_size, shuffle=False, device_resident=resident))


def build_trainer(cfg: Config, run_dir: Path, max_epochs: int, patience: int,
                  extra_callbacks: list[Callback] | None = None) -> L.Trainer:
    """A Lightning Trainer with early stopping on ``val_loss``, its best checkpoint, and the last
    epoch's checkpoint (to resume from)."""
    t = cfg.trainer
    keep_freed_memory()  # ~12 % faster CPU steps: no page faults for re-allocated tensors
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for float32 runs on Ampere and newer
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val_loss", mode="min",
                        save_top_k=1, enable_version_counter=False),
        # every epoch, to resume from (Lightning's save_last writes only when "best" improves)
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False),
        ResumableEarlyStopping(monitor="val_loss", mode="min", patience=patience),
        *(extra_callbacks or []),
        *([EpochProgressBar()] if t.progress else []),
    ]
    callbacks.append(EpochCSV(run_dir / "metrics.csv"))
    loggers: list[Any] = []
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401
        loggers.append(TensorBoardLogger(save_dir=run_dir, name="tensorboard", version=""))
    except ImportError:
        pass
    try:
        return L.Trainer(
            accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
            precision=resolve_precision(cfg), max_epochs=max_epochs, gradient_clip_val=t.grad_clip or None,
            callbacks=callbacks, logger=loggers or False, plugins=[SafeCheckpointIO()],
            deterministic=t.deterministic, enable_progress_bar=t.progress, enable_model_summary=False,
            log_every_n_steps=1, num_sanity_val_steps=0,
        )
    except (MisconfigurationException, ValueError) as exc:
        raise ConfigError(f"Lightning refused the trainer settings (accelerator {t.accelerator!r}, devices {t.devices}, "
                          f"num_nodes {t.num_nodes}, strategy {t.strategy!r}, precision {t.precision!r}): "
                          f"{str(exc).strip().splitlines()[0]}") from None


class ResumableEarlyStopping(EarlyStopping):
    """Lightning's early stopping on ``val_loss``, except that a resumed run keeps the patience it
    is started with (``--resume`` may change it) instead of the one saved in the checkpoint; the
    count of epochs without improvement and the best loss come from the checkpoint."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience

    @property
    def state_key(self) -> str:
        """Lightning's key of ``EarlyStopping``, so that checkpoints written before this class load."""
        return self._generate_state_key(monitor=self.monitor, mode=self.mode).replace(
            type(self).__qualname__, EarlyStopping.__qualname__, 1)


class EpochProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with epochs counted as everywhere else in aemt: "Epoch 2/6"."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")


class EpochCSV(Callback):
    """One row per epoch (its number from 1, train and validation metrics, learning rate) appended to a CSV.

    Unlike Lightning's CSVLogger, it keeps the rows of earlier epochs when a run resumes, and
    rewrites the file atomically."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        row = {"epoch": trainer.current_epoch + 1, "lr": trainer.optimizers[0].param_groups[0]["lr"]}
        row.update({k: float(v) for k, v in sorted(trainer.callback_metrics.items())})
        rows = []
        if self.path.is_file():
            with open(self.path, newline="") as handle:
                rows = list(csv.DictReader(handle))
            shift = 1 if rows and int(rows[0]["epoch"]) == 0 else 0  # a run started when epochs counted from 0
            rows = [{**r, "epoch": int(r["epoch"]) + shift} for r in rows if int(r["epoch"]) + shift < row["epoch"]]
        rows.append(row)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, buffer.getvalue())


_RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    """Let dynamo keep up to :data:`_RECOMPILE_LIMIT` graphs per function (default 8)."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), _RECOMPILE_LIMIT))


class DynamicBatchModel:
    """``torch.compile(model, **options)`` called as ``fn(features, masks)``, with the batch dim of
    every input marked dynamic: one graph serves every batch size (an epoch's last, smaller batch,
    validation). With ``dynamic=False`` (the ``cudagraphs`` backend) nothing is marked and every
    shape is static: one graph per batch size. A class rather than a closure, so a Lightning
    module holding it still pickles (``ddp_spawn``)."""

    def __init__(self, model: torch.nn.Module, **options: Any) -> None:
        self.compiled = torch.compile(model, **options)
        self.dynamic_batch = options.get("dynamic") is not False

    def __call__(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> Any:
        if self.dynamic_batch:
            for tensor in (*features.values(), *masks.values()):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return self.compiled(features, masks)


def compile_model(model: torch.nn.Module, mode: str, scope: str = "model",
                  backend: str = "inductor") -> Callable[..., Any]:
    """``model`` compiled by ``torch.compile``, called as ``fn(features, masks)``.

    ``backend="inductor"`` generates fused kernels (``mode``, e.g. ``"reduce-overhead"`` to replay
    them as CUDA graphs); ``backend="cudagraphs"`` replays the traced graph's own operators as
    CUDA graphs, without generating code (``mode`` must be ``"default"``), so it compiles in
    seconds, once per batch size; on the CPU it runs the traced graph as it is.

    ``scope="model"``: the whole model as one graph (:class:`DynamicBatchModel`).
    ``scope="blocks"``: each Transformer block compiled apart, in place, with dynamic shapes
    (regional compilation): blocks of one kind share compiled code, so compiling is several times
    faster, and the glue between blocks runs eagerly. Not with CUDA graphs (the config refuses
    them, see :meth:`aemt.config.TrainerConfig.uses_cuda_graphs`): outside a backward, each
    block's replay would free the output the next block reads (pytorch/pytorch#152887).

    Turns inductor's layout optimisation off for the whole process
    (``torch._inductor.config.layout_optimization``; ``torch.compile`` takes a ``mode`` or
    ``options``, not both).
    """
    # inductor's layout optimisation (channels-last for graphs with convolutions) stored the
    # grouped decoders' (3, B, L, d) activations with the batch dim innermost, and the backward's
    # memory-format checks then specialised the graph to the batch size it first saw
    torch._inductor.config.layout_optimization = False
    if backend not in COMPILE_BACKENDS or (backend == "cudagraphs" and (mode != "default" or scope != "model")):
        raise ValueError(f"compile backend {backend!r} with mode {mode!r} and scope {scope!r}: expected one of "
                         f"{COMPILE_BACKENDS}, and with 'cudagraphs' mode 'default' and scope 'model'")
    if scope == "model" and backend == "cudagraphs":
        # static shapes, also in the pieces after any graph break: this backend replays one
        # recording for every batch size of a dynamic graph and failed at an epoch's smaller last
        # batch (torch 2.11: "The size of tensor a (64) must match the size of tensor b (49)").
        # One graph per batch size and grad mode; with both stages' models in one process a
        # fine-tuning run passed dynamo's default limit of 8 on an H200, and the batch sizes
        # past it ran uncompiled
        _raise_recompile_limit()
        return DynamicBatchModel(model, backend="cudagraphs", dynamic=False)
    if scope == "model":
        return DynamicBatchModel(model, mode=mode)
    # dynamo keeps one cache per function, and all blocks of a class share their forward: its
    # variants (grad mode, inference tensors, grouped or not, one query step) pass the default 8
    _raise_recompile_limit()
    for module in model.modules():
        if isinstance(module, (EncoderBlock, CrossBlock, DecoderBlock)):
            module.compile(mode=mode, dynamic=True)
    return model


class StageModule(L.LightningModule):
    """What both stages' Lightning modules share: the model (optionally compiled) and the
    optimiser of the stage's config section (``cfg.pretrain`` or ``cfg.finetune``)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, stage: str) -> None:
        super().__init__()
        self.cfg, self.stage = cfg, stage
        self.model = model
        # kept out of the module tree so the state dict has one copy of the weights
        t = cfg.trainer
        self.__dict__["forward_fn"] = (compile_model(model, t.compile_mode, t.compile_scope, t.compile_backend)
                                       if t.compile else model)
        self._epoch_sums: dict[str, tuple[list[str], torch.Tensor, int]] = {}  # stage: names, sums, clips
        self._epoch_loss: dict[str, torch.Tensor | None] = {}  # stage: this epoch's mean loss (this rank)
        # the training loader's shuffling generator, kept in checkpoints (set by resume.fit)
        self.shuffle_generator: torch.Generator | None = None

    def log_epoch_means(self, stage: str, values: dict[str, torch.Tensor], batch_size: int, batch_idx: int) -> None:
        """Log each of ``values`` (named ``f"{stage}_{key}"``) as its mean over the epoch's clips,
        what ``self.log(..., on_epoch=True, batch_size=...)`` logs, at a fraction of its cost per step.

        Lightning updates one metric object per value and step: ~6 operator calls each (each a
        kernel launch on a GPU) and ~0.3 ms of Python. Here a step adds its values, weighted by
        ``batch_size``, to one running sum (three calls), and the means are logged once: training
        means at the epoch's last training batch (before the callbacks' ``on_train_epoch_end``
        reads them), validation means at the end of validation (shown in the progress bar); both
        averaged over the DDP ranks, which see equal numbers of clips.
        """
        sums, clips = torch.stack([v.detach().float() for v in values.values()]) * batch_size, batch_size
        if stage in self._epoch_sums:
            _, running, before = self._epoch_sums[stage]
            sums, clips = running.add_(sums), before + batch_size
        self._epoch_sums[stage] = (list(values), sums, clips)
        if stage == "train" and batch_idx + 1 == self.trainer.num_training_batches:
            self._log_means("train")

    def _log_means(self, stage: str) -> None:
        if stage not in self._epoch_sums:
            return
        names, sums, clips = self._epoch_sums.pop(stage)
        self._epoch_loss[stage] = sums[names.index("loss")] / clips if "loss" in names else None
        self.log_dict(dict(zip((f"{stage}_{k}" for k in names), (sums / clips).unbind())), on_step=False,
                      on_epoch=True, batch_size=clips, prog_bar=stage == "val", sync_dist=True)

    def on_train_epoch_start(self) -> None:
        self._epoch_sums.pop("train", None)  # e.g. left by an epoch that was interrupted

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng.capture(self.shuffle_generator)

    def on_validation_epoch_start(self) -> None:
        self._epoch_sums.pop("val", None)

    def on_validation_epoch_end(self) -> None:  # before checkpointing, early stopping and the LR schedule
        self._log_means("val")
        if not self.trainer.sanity_checking:
            self._refuse_divergence()

    def _refuse_divergence(self) -> None:
        """Stop with one :class:`RunError` once an epoch's mean training or validation loss is not
        finite, before its checkpoint is written: every later epoch would be NaN too, and the
        run would otherwise end at a confusing error about its checkpoint's weights.

        The losses are summed over the DDP ranks (one collective per epoch), so every rank stops
        and names the non-finite value. Under fp16 loss scaling the training loss is left out: the
        scaler skips a step whose values overflow, and training goes on."""
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        epoch = {stage: self._epoch_loss.pop(stage, None) for stage in ("train", "val")}
        checked = {f"{stage}_loss": loss for stage, loss in epoch.items()
                   if loss is not None and not (scaled and stage == "train")}  # the same keys on every rank
        if not checked:
            return
        summed = self.trainer.strategy.reduce(torch.stack([v.float() for v in checked.values()]), reduce_op="sum")
        bad = {name: float(v) for name, v in zip(checked, summed) if not math.isfinite(float(v))}
        if bad:
            section = getattr(self.cfg, self.stage)
            shown = ", ".join(f"{k} = {v}" for k, v in bad.items())
            world = self.trainer.world_size
            rank = f" (DDP rank {self.global_rank} of {world})" if world > 1 else ""
            raise RunError(f"{self.stage} diverged in epoch {self.current_epoch + 1}{rank}: {shown}. Try a lower learning "
                           f"rate ({self.stage}.lr, now {section.lr:g}) or gradient clipping (trainer.grad_clip, "
                           f"now {self.cfg.trainer.grad_clip:g}) in a new --out (a resumed run keeps its settings); "
                           f"with data.standardize {str(self.cfg.data.standardize).lower()}, check the features' scale")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to resume a checkpoint of an older layout (per-modality autoencoders): its
        weights would convert, but its optimiser state would not; and one whose weights do not
        fit this model."""
        state = checkpoint.get("state_dict", {})
        if upgrade_state_dict(state, self.model.state_dict()).keys() != state.keys():
            raise RunError("this checkpoint was written by an older aemt (one autoencoder per modality) and "
                           "cannot be resumed; start a new run (its model.pt still loads for prediction and "
                           "as --pretrained)")
        where = self._trainer.ckpt_path if self._trainer is not None else "the checkpoint"
        mismatches = weight_mismatches(state, self.state_dict())
        if mismatches:
            raise RunError(f"'{where}': its weights do not fit this model ({mismatches}); it cannot be resumed")
        if "optimizer_states" in checkpoint:
            groups = [g for opt in checkpoint["optimizer_states"] for g in opt.get("param_groups", [])]
            saved, expected = sum(len(g.get("params", ())) for g in groups), len(list(self.parameters()))
            if len(checkpoint["optimizer_states"]) != 1 or saved != expected:
                raise RunError(f"'{where}': its optimiser state covers {saved} parameter tensors in {len(groups)} "
                               f"groups, this model's Adam {expected} in 1; it cannot be resumed")
        self._restore_random_state(checkpoint)

    def _restore_random_state(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run continues with the random state its checkpoint was saved with, restored when
        the checkpoint is read: before Lightning makes the first epoch's loader iterator (which draws
        from the shuffling generator), so batches, masks and tampering are an uninterrupted run's."""
        if "rng_states" in checkpoint:
            try:
                rng.restore(checkpoint["rng_states"], self.shuffle_generator)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                where = self._trainer.ckpt_path if self._trainer is not None else "the checkpoint"
                raise RunError(f"'{where}': its random state ('rng_states') is damaged ({type(exc).__name__}: "
                               f"{exc}); it cannot be resumed") from None

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam + ReduceLROnPlateau on ``val_loss`` (paper Table 2)."""
        section = getattr(self.cfg, self.stage)
        # a loss scaler (fp16 autocast) leaves the gradients scaled until a fused step: no clipping then
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        clipped_scaled = scaler is not None and bool(self.cfg.trainer.grad_clip)
        optimizer = adam(self.parameters(), lr=section.lr, weight_decay=section.weight_decay, fused=not clipped_scaled)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=self.cfg.trainer.lr_factor, patience=self.cfg.trainer.lr_patience)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip as Lightning does, also for the fused Adam under bf16 autocast.

        Lightning's mixed-precision plugin refuses to clip for any fused optimiser, because under
        fp16 its loss scaler leaves the gradients scaled until the fused step. bf16 has no scaler,
        so the gradients are final here, and the plain precision's clipping is right. On a GPU the
        fused step is ~4 calls instead of foreach Adam's ~240 (one host read per parameter tensor
        plus its kernels) per pre-training step. (With ``trainer.strategy: deepspeed`` Lightning
        warns that this hook does not clip: DeepSpeed clips by its own config there.)
        """
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType((gradient_clip_algorithm or "norm").lower())  # a str enum, or a str
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def quiet_lightning() -> None:
    """Silence Lightning's start-up chatter (GPU/TPU availability lines, tips)."""
    import logging
    import warnings

    os.environ.setdefault("POSSIBLE_USER_WARNING", "off")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LightningModule.*`training_step` returned.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
