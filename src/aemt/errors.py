"""The exceptions aemt raises for bad user input. Each message names the file, split, key and
expected vs actual value, so a user can fix the input without reading a traceback."""

from __future__ import annotations


class AEMTError(Exception):
    """Base class of every error aemt raises on purpose."""


class DataError(AEMTError):
    """A data file is missing, unreadable, unsafe or malformed."""

    def __init__(self, message: str, *, file: str | None = None, split: str | None = None,
                 key: str | None = None) -> None:
        where = ", ".join(
            f"{name} '{value}'" for name, value in (("file", file), ("split", split), ("key", key)) if value
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.file, self.split, self.key = file, split, key


class UnsafePickleError(DataError):
    """A pickle asked to load something other than numpy arrays and plain containers."""


class ConfigError(AEMTError):
    """A configuration value is unknown, ill-typed or out of range."""


class RunError(AEMTError):
    """A run directory is missing or incomplete (no config, no checkpoint...), or a run of an
    experiment failed on bad input."""


class TrainingInterrupted(AEMTError):
    """Training stopped by Ctrl-C; the run's last finished epoch is in its ``last.ckpt``."""
