"""A restricted unpickler for MMSA feature files.

A pickle can name any importable callable and make the loader call it (``os.system`` included),
so user files are never read with the plain unpickler. This one admits only what MMSA files
are made of: numpy arrays, dtypes and scalars, and plain containers, strings and numbers.
Anything else raises :class:`~aemt.errors.UnsafePickleError` before it is called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from aemt.errors import DataError, UnsafePickleError
from aemt.io_utils import require_file

# (module, name) pairs a numpy array pickle needs, for numpy 1.x ("numpy.core") and 2.x ("numpy._core").
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    (module, name)
    for prefix in ("numpy.core", "numpy._core")
    for module, name in (
        (f"{prefix}.multiarray", "_reconstruct"),
        (f"{prefix}.multiarray", "scalar"),
        (f"{prefix}.numeric", "_frombuffer"),
    )
) | frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("builtins", "slice"),
        ("builtins", "range"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_ALLOWED`` (numpy dtypes such as
    ``numpy.dtypes.Float32DType`` are admitted by their module)."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - pickle API
        if (module, name) in _ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refused to load '{module}.{name}': only numpy arrays and plain containers are "
            "allowed in a feature pickle (this file may try to run code)"
        )


def safe_load_pickle(path: str | Path) -> Any:
    """Read ``path`` with :class:`RestrictedUnpickler`; raise :class:`DataError` naming the file
    when it is missing, not a pickle, or asks for anything but numpy arrays and containers."""
    path = Path(path)
    require_file(path)
    try:
        with open(path, "rb", buffering=1 << 20) as handle:  # a 1 MB buffer: fewer reads of a multi-GB file
            return RestrictedUnpickler(handle).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(str(exc), file=str(path)) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, OverflowError, MemoryError) as exc:
        raise DataError(
            f"not a readable pickle ({type(exc).__name__}: {exc}); expected an MMSA feature file",
            file=str(path),
        ) from None
