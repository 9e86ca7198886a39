"""The random state a resumed run needs to continue exactly as an uninterrupted one would.

A checkpoint written at the end of an epoch keeps torch's (and CUDA's), numpy's and Python's
global generators and the training loader's shuffling generator; a resumed run restores them
before its first epoch, so its masks, tampering and batch order are those the run would have
drawn. Everything is kept as tensors and plain Python values, which ``weights_only`` loading reads.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture(loader_generator: torch.Generator | None) -> dict[str, Any]:
    """The global generators' states, and ``loader_generator``'s."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        states["loader"] = loader_generator.get_state()
    return states


def restore(states: dict[str, Any], loader_generator: torch.Generator | None) -> None:
    """Set the generators to ``states`` (from :func:`capture`); parts the checkpoint lacks, or a
    CUDA state for another number of devices, are left as they are."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if loader_generator is not None and "loader" in states:
        loader_generator.set_state(states["loader"])
