"""The ``aemt`` command line (Typer). Heavy imports (torch, lightning) happen inside the commands
that need them, so ``aemt score`` and ``aemt data inspect`` answer in about a second."""

from __future__ import annotations

from aemt.cli.app import app, main

__all__ = ["app", "main"]
