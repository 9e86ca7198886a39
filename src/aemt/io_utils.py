"""Small file helpers: atomic writes (temp file in the same folder, then rename), and where a
new file or folder would land."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from aemt.errors import DataError


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest existing parent: where a file or folder written at
    ``path`` would be created (if that is a file, nothing can be)."""
    path = Path(path).absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def require_file(path: Path) -> None:
    """Raise a :class:`~aemt.errors.DataError` naming ``path`` unless it is an existing file."""
    if not path.is_file():
        raise DataError("expected a file, got a folder" if path.is_dir() else "file not found", file=str(path))
