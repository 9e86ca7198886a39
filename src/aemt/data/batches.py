"""In-memory batching: whole splits live as tensors and a batch is one vectorised index.

``ClipTensors`` implements ``__getitems__`` so a ``DataLoader`` with ``batch_size`` fetches a
batch with a single fancy-index per array (no per-clip Python); Lightning can still inject its
``DistributedSampler`` for DDP. A batch is a dict: ``text``/``audio``/``vision`` (B, T, D) float,
``text_len``/... (B,) long, ``index`` (B,) long and, for labeled splits, ``label`` (B, 4) with
columns M, T, A, V.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from aemt.data.mmsa import MODALITIES, Split

LABEL_ORDER = ("M", "T", "A", "V")


class ClipTensors(Dataset):
    """A split as tensors, indexable by a batch of clip indices."""

    def __init__(self, split: Split) -> None:
        self.name = split.name
        self.tensors: dict[str, torch.Tensor] = {}
        for m in MODALITIES:
            self.tensors[m] = torch.from_numpy(np.array(split.features[m], dtype=np.float32))
            self.tensors[f"{m}_len"] = torch.from_numpy(np.array(split.lengths[m], dtype=np.int64))
        if split.labels:
            self.tensors["label"] = torch.from_numpy(
                np.stack([np.asarray(split.labels[k], dtype=np.float32) for k in LABEL_ORDER], axis=1).copy())
        self.tensors["index"] = torch.arange(split.n)

    def __len__(self) -> int:
        return int(self.tensors["index"].shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {key: value.index_select(0, idx) for key, value in self.tensors.items()}


def _as_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return batch


def make_loader(split: Split, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over a split held in memory (no worker processes needed)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ClipTensors(split), batch_size=batch_size, shuffle=shuffle, drop_last=False,
                      collate_fn=_as_batch, generator=generator)


def masks_from_lengths(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(B, T) boolean masks, True on valid frames, for every modality of a batch."""
    return {m: torch.arange(batch[m].shape[1], device=batch[m].device)[None, :] < batch[f"{m}_len"][:, None]
            for m in MODALITIES}
