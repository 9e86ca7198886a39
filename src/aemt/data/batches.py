"""In-memory batching: whole splits live as tensors and a batch is one vectorised index.

``ClipTensors`` implements ``__getitems__`` so a ``DataLoader`` with ``batch_size`` fetches a
batch with a single fancy-index per array (no per-clip Python); Lightning can still inject its
``DistributedSampler`` for DDP. When training on a GPU a split can live in GPU memory
(``device_resident``): a batch is then gathered on the GPU, and a step copies only its clip
indices to the device (pinned, asynchronous) instead of its features (~12 MB per pre-training
batch of 64 at CH-SIMS v2 shapes, cut on the host and copied from pageable memory, which waits
for the GPU to go idle). A batch is a dict: ``text``/``audio``/``vision`` (B, T, D) float,
``text_len``/... (B,) long, ``index`` (B,) long and, for labeled splits, ``label`` (B, 4) with
columns M, T, A, V.
"""

from __future__ import annotations

import gc
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from aemt.config_checks import DEVICE_RESIDENT
from aemt.data.mmsa import MODALITIES, Split

LABEL_ORDER = ("M", "T", "A", "V")
_AUTO_FRACTION = 0.25  # "auto": a split moves to the GPU if it takes at most this share of free memory

log = logging.getLogger(__name__)


def _as_tensor(a: np.ndarray, dtype: type) -> torch.Tensor:
    """``a`` as a CPU tensor: sharing its memory when it is a writable C-contiguous array of
    ``dtype`` (a standardised split: no second copy of the data for the whole run), else a copy
    (another dtype, or a read-only array)."""
    if isinstance(a, np.ndarray) and a.dtype == dtype and a.flags.writeable and a.flags.c_contiguous:
        return torch.from_numpy(a)
    return torch.from_numpy(np.array(a, dtype=dtype))


class ClipTensors(Dataset):
    """A split as tensors, indexable by a batch of clip indices.

    ``device_resident`` (one of :data:`DEVICE_RESIDENT`): whether the tensors move to the current
    CUDA device on the first fetch in each process (so each DDP rank uses its own GPU, and the
    split pickles as CPU tensors for spawned processes). ``"auto"`` moves them when CUDA is
    available and they take at most a quarter of the free GPU memory; ``"always"`` whenever CUDA is
    available; ``"never"`` keeps them on the CPU.
    """

    def __init__(self, split: Split, device_resident: str = "never") -> None:
        if device_resident not in DEVICE_RESIDENT:
            raise ValueError(f"device_resident must be one of {DEVICE_RESIDENT}, got {device_resident!r}")
        self.name, self.device_resident = split.name, device_resident
        self._placed = device_resident == "never"
        self.tensors: dict[str, torch.Tensor] = {}
        for m in MODALITIES:
            self.tensors[m] = _as_tensor(split.features[m], np.float32)
            self.tensors[f"{m}_len"] = _as_tensor(split.lengths[m], np.int64)
        if split.labels:
            self.tensors["label"] = torch.from_numpy(
                np.stack([np.asarray(split.labels[k], dtype=np.float32) for k in LABEL_ORDER], axis=1).copy())
        self.tensors["index"] = torch.arange(split.n)

    def __len__(self) -> int:
        return int(self.tensors["index"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])

    def nbytes(self) -> int:
        """Bytes held by the split's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def _place(self) -> None:
        self._placed = True
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda", torch.cuda.current_device())
        if self.device_resident == "auto":
            gc.collect()  # an earlier stage's splits may still be held by reference cycles
            free, _ = torch.cuda.mem_get_info(device)
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
            if self.nbytes() > _AUTO_FRACTION * free:
                log.warning("split '%s' (%.0f MB) stays in host memory: over a quarter of the %.0f MB free on %s",
                            self.name, self.nbytes() / 2**20, free / 2**20, device)
                return
        self.tensors = {key: value.to(device) for key, value in self.tensors.items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if not self._placed:
            self._place()
        idx = torch.as_tensor(indices, dtype=torch.long)
        device = self.tensors["index"].device
        if device.type == "cuda":
            idx = idx.pin_memory().to(device, non_blocking=True)
        return {key: value.index_select(0, idx) for key, value in self.tensors.items()}


def _as_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def make_loader(split: Split, batch_size: int, shuffle: bool, seed: int = 0,
                device_resident: str = "never") -> DataLoader:
    """A DataLoader over a split held in memory (no worker processes needed); ``device_resident``
    as in :class:`ClipTensors`."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ClipTensors(split, device_resident), batch_size=batch_size, shuffle=shuffle, drop_last=False,
                      collate_fn=_as_batch, generator=generator)


def masks_from_lengths(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(B, T) boolean masks, True on valid frames, for every modality of a batch."""
    return {m: torch.arange(batch[m].shape[1], device=batch[m].device)[None, :] < batch[f"{m}_len"][:, None]
            for m in MODALITIES}
