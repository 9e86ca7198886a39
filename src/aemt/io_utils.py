"""Small output helpers: atomic writes (temp file in the same folder, then rename) with the
permissions a plain ``open``/``mkdir`` gives, where a new file or folder would land, JSON text
without NaN, and the CLI's one-line warning format (shared with the experiment's workers)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from aemt.errors import DataError, RunError


def current_umask() -> int:
    """The process umask, read without changing it where the system shows it (Linux's
    ``/proc/self/status``), else by setting it and setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # briefly a stricter mask, never a looser one, should another thread create a file
    os.umask(mask)
    return mask


def _chmod(path: str | Path, mode: int) -> None:
    """``os.chmod``, where the file system allows it (some mounts, e.g. vfat or CIFS, refuse)."""
    try:
        os.chmod(path, mode)
    except OSError:
        pass


def temp_folder(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` (``tempfile.mkdtemp``), with the permissions ``mkdir``
    gives under the umask rather than mkdtemp's 0700, so that it can be renamed into place."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    _chmod(folder, 0o777 & ~current_umask())
    return folder


@contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success it replaces ``path`` in one rename. The file
    gets the permissions ``open(path, "w")`` gives a new file under the umask (not mkstemp's 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            _chmod(tmp, 0o666 & ~current_umask())
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


def require_folder_path(path: Path, option: str, expected: str = "a folder") -> None:
    """Raise a :class:`~aemt.errors.RunError` unless a folder can be at ``path`` (given as
    ``option``): it is one, or it can be made because no existing file is in the way."""
    blocker = nearest_existing(path)
    if not blocker.is_dir():
        where = "is an existing file" if blocker == Path(path).absolute() else f"lies under the existing file '{blocker}'"
        raise RunError(f"{option} '{path}' {where}; expected {expected}")


def require_file(path: Path) -> None:
    """Raise a :class:`~aemt.errors.DataError` naming ``path`` unless it is an existing file."""
    if not path.is_file():
        raise DataError("expected a file, got a folder" if path.is_dir() else "file not found", file=str(path))


def _nulls(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) in it, however deep, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulls(v) for v in value]
    return value


def json_text(value: Any, **kwargs: Any) -> str:
    """``json.dumps(value, **kwargs)`` that is valid JSON: NaN and infinities become ``null``
    (Python's default writes a bare ``NaN``, which JSON has not)."""
    return json.dumps(_nulls(value), allow_nan=False, **kwargs)


def one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """A ``warnings.formatwarning`` that prints ``warning: MESSAGE``, not the source line that raised it."""
    return f"warning: {message}\n"
