"""In-memory batching: loaders cover a split once per epoch, and GPU residency is decided per process."""

from __future__ import annotations

import logging

import pytest
import torch

from aemt.config import load_config
from aemt.data.batches import ClipTensors, make_loader
from aemt.data.mmsa import MODALITIES, Split
from aemt.evaluation.bench import _random_split
from aemt.training.common import stage_loaders


def _split(n: int = 10, seed: int = 0) -> Split:
    return _random_split("train", n, seq_len=5, labeled=True, seed=seed)


def test_shuffled_loader_gathers_every_clip_once_with_its_own_rows():
    split = _split()
    batches = list(make_loader(split, 4, shuffle=True, seed=3))
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    order = torch.cat([b["index"] for b in batches])
    assert sorted(order.tolist()) == list(range(10)) and order.tolist() != list(range(10))
    for b in batches:
        for m in MODALITIES:
            assert torch.equal(b[m], torch.from_numpy(split.features[m][b["index"].numpy()]))
            assert torch.equal(b[f"{m}_len"], torch.from_numpy(split.lengths[m][b["index"].numpy()]))
        assert torch.equal(b["label"][:, 0], torch.from_numpy(split.labels["M"][b["index"].numpy()]))
    again = torch.cat([b["index"] for b in make_loader(split, 4, shuffle=True, seed=3)])
    assert torch.equal(order, again)  # the seed decides the order


def test_device_resident_value_is_checked():
    with pytest.raises(ValueError, match="device_resident must be one of"):
        ClipTensors(_split(), device_resident="gpu")


def _fake_cuda(monkeypatch, free_bytes: int) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: calls.append("is_available") or True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 4 * free_bytes))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    return calls


def test_auto_keeps_a_split_in_host_memory_when_it_would_take_over_a_quarter_of_the_free_gpu_memory(
        monkeypatch, caplog):
    data = ClipTensors(_split(), device_resident="auto")
    _fake_cuda(monkeypatch, free_bytes=data.nbytes() * 3)  # the split would take a third
    with caplog.at_level(logging.WARNING, logger="aemt.data.batches"):
        batch = data.__getitems__([1, 2])
    assert batch["text"].device.type == "cpu"
    assert "stays in host memory" in caplog.text and "'train'" in caplog.text


def test_never_does_not_look_for_a_gpu(monkeypatch):
    calls = _fake_cuda(monkeypatch, free_bytes=1 << 40)
    batch = ClipTensors(_split(), device_resident="never").__getitems__([0])
    assert batch["audio"].device.type == "cpu" and calls == []


def test_stage_loaders_keep_the_splits_on_the_host_unless_training_on_a_gpu(monkeypatch):
    cpu = load_config("synthetic", {"trainer.accelerator": "cpu", "data.device_resident": "always"})
    train, valid = stage_loaders(cpu, _split(), _split(6, seed=1), batch_size=4)
    assert train.dataset.device_resident == valid.dataset.device_resident == "never"
    _fake_cuda(monkeypatch, free_bytes=1 << 40)
    gpu = load_config("synthetic", {"trainer.accelerator": "auto", "data.device_resident": "always"})
    train, valid = stage_loaders(gpu, _split(), _split(6, seed=1), batch_size=4)
    assert train.dataset.device_resident == valid.dataset.device_resident == "always"
    assert len(train) == 3 and len(valid) == 2


def test_clip_tensors_share_the_loaded_arrays_and_a_write_never_reaches_the_cache(tmp_path):
    """No second copy of a split: the tensors wrap the loaded arrays, which on a cache hit are
    copy-on-write memory maps (standardised ones too), so the cache files stay as they were."""
    import warnings

    import numpy as np

    from aemt.data.dataset import load_labeled
    from aemt.data.synthetic import write_synthetic

    labeled, _ = write_synthetic(tmp_path, n_train=8, n_valid=4, n_test=4, n_unlabeled=2)
    for standardize in (False, True):  # a first load computes in memory, a second one maps the cache
        for first in (True, False):
            data = load_labeled(labeled, seq_len=6, standardize_features=standardize)
            assert (data.stats is not None) == standardize
            split = data["train"]
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # torch warns when it wraps a read-only array
                tensors = ClipTensors(split).tensors
            for m in MODALITIES:
                assert isinstance(split.features[m], np.memmap) != first
                assert np.shares_memory(tensors[m].numpy(), split.features[m])
            if not first:
                before = split.features["audio"].copy()
                tensors["audio"].add_(1.0)
                again = load_labeled(labeled, seq_len=6, standardize_features=standardize)["train"]
                assert np.array_equal(again.features["audio"], before)
