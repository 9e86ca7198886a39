"""Typer application: registers the command groups and turns aemt errors into one clear line."""

from __future__ import annotations

import sys
import warnings

import typer

from aemt.errors import AEMTError, TrainingInterrupted
from aemt.io_utils import one_line_warning

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="AE-MT multimodal sentiment analysis: data, training, evaluation, experiments.")

from aemt.cli import bench_commands, data_commands, experiment_commands, train_commands  # noqa: E402,F401  (registers commands)


def main() -> None:
    """Console-script entry point."""
    warnings.formatwarning = one_line_warning  # "warning: ...", not the source line that raised it
    try:
        app()
    except TrainingInterrupted as exc:
        typer.secho(str(exc), fg="yellow", err=True)
        sys.exit(130)  # the shell's code for Ctrl-C
    except AEMTError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
