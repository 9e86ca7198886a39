"""``aemt pretrain|finetune|evaluate|predict|demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from aemt.cli.app import app
from aemt.cli.data_commands import console, print_metrics_table
from aemt.errors import ConfigError
from aemt.io_utils import json_text

# options shared by `pretrain` and `finetune`
ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="A preset (sims2, mosei, mosi, synthetic) or a YAML file.")]
OutOpt = Annotated[Path, typer.Option(help="Run directory.")]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Epochs of this stage.")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto, cpu or gpu.")]
DevicesOpt = Annotated[Optional[int], typer.Option(help="Number of devices (DDP when > 1).")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override any config key, e.g. --set finetune.lambda2=0 (repeatable).")]


def parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    """``key=value`` strings to a dict of dotted overrides (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set: expected KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve(config: str, stage: str, epochs: int | None, seed: int | None, device: str | None,
            devices: int | None, sets: list[str] | None, run_dir: Path | None = None, resume: bool = False):
    """Load a config and apply the common CLI overrides (a resumed run reuses its saved config)."""
    from aemt.config import load_config

    overrides = parse_sets(sets)
    given = ["--set"] if sets else []  # the options an error may come from, as the command line gave them
    for option, key, value in (("--epochs", f"{stage}.epochs", epochs), ("--seed", "trainer.seed", seed),
                               ("--device", "trainer.accelerator", device), ("--devices", "trainer.devices", devices)):
        if value is not None:
            overrides[key] = value
            given.append(option)
    if resume and run_dir is not None and (run_dir / "config.yaml").is_file():
        config = str(run_dir / "config.yaml")
    return load_config(config, overrides, origin=f"command line ({', '.join(given)})")


@app.command("pretrain")
def pretrain_cmd(
    config: ConfigOpt,
    data: Annotated[Path, typer.Option(help="Unlabeled MMSA file (or a labeled file with a train_mix split).")],
    out: OutOpt, epochs: EpochsOpt = None, seed: SeedOpt = None, device: DeviceOpt = None,
    devices: DevicesOpt = None, resume: ResumeOpt = False, set_: SetOpt = None,
) -> None:
    """Stage 1: pre-train the per-modality autoencoders (reconstruction + consistency detection)."""
    from aemt.training.pretrain import pretrain

    cfg = resolve(config, "pretrain", epochs, seed, device, devices, set_, out, resume)
    run = pretrain(cfg, data, out, resume=resume)
    console.print(f"pre-training run: {run}")


@app.command("finetune")
def finetune_cmd(
    config: ConfigOpt,
    data: Annotated[Path, typer.Option(help="Labeled MMSA file (train/valid/test).")],
    out: OutOpt,
    pretrained: Annotated[Optional[Path], typer.Option(help="Pre-training run directory (omit: from scratch).")] = None,
    epochs: EpochsOpt = None, seed: SeedOpt = None, device: DeviceOpt = None,
    devices: DevicesOpt = None, resume: ResumeOpt = False, set_: SetOpt = None,
) -> None:
    """Stage 2: fine-tune AE-MT (MulT + pre-trained encoders + contrastive loss); test at the end."""
    from aemt.training.finetune import finetune

    cfg = resolve(config, "finetune", epochs, seed, device, devices, set_, out, resume)
    metrics = finetune(cfg, data, out, pretrained_dir=pretrained, resume=resume)
    if metrics:
        print_metrics_table({out.name: metrics}, title=f"test metrics (x100), {out}")


@app.command("evaluate")
def evaluate_cmd(
    run: Path = typer.Option(..., help="Fine-tuning run directory."),
    data: Path = typer.Option(..., help="Labeled MMSA file."),
    split: str = typer.Option("test", help="Split to score."),
    drop: Optional[list[str]] = typer.Option(None, help="Remove a modality at test time (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print MMSA's keys and values as JSON (undefined: null)."),
) -> None:
    """MMSA metrics of a trained run on a split."""
    from aemt.evaluation.predict import evaluate

    metrics = evaluate(run, data, split, drop=drop or ())
    if as_json:
        typer.echo(json_text(metrics))
    else:
        removed = f", {' and '.join(drop)} removed (zeroed, one frame)" if drop else ""
        print_metrics_table({run.name: metrics}, title=f"{split} metrics (x100){removed}")


@app.command("predict")
def predict_cmd(
    run: Path = typer.Option(..., help="Fine-tuning run directory."),
    data: Path = typer.Option(..., help="MMSA file, labeled or not."),
    out: Path = typer.Option(..., help="Output CSV."),
    split: Optional[str] = typer.Option(None, help="Split to predict, of any file, labeled or not (default: a "
                                        "labeled file's test split; every clip of a file without labels)."),
) -> None:
    """Per-clip predictions (CSV: id, labels when known, prediction; a file without labels: id, split, prediction)."""
    from aemt.evaluation.predict import predict

    n = predict(run, data, out, split)
    console.print(f"wrote {n} predictions to {out}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo_out"), help="Folder for the data, runs and summary."),
    seed: int = typer.Option(1111, help="Random seed."),
    pretrain_epochs: Optional[int] = typer.Option(None, help="Override the preset's pre-training epochs."),
    finetune_epochs: Optional[int] = typer.Option(None, help="Override the preset's fine-tuning epochs."),
) -> None:
    """The main job: synthetic data → pre-train → fine-tune AE-MT → MulT baseline → side-by-side metrics."""
    from aemt.evaluation.demo import run_demo

    rows = run_demo(out, seed=seed, pretrain_epochs=pretrain_epochs, finetune_epochs=finetune_epochs,
                    log=console.print)
    print_metrics_table(rows, title="synthetic CH-SIMS-v2-like test set, MMSA metrics (x100)")
