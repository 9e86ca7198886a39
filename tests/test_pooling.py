"""Valid-frame pooling matches a slow per-clip reference; padding never dilutes averages."""

from __future__ import annotations

import numpy as np
import pytest

from aemt.data.dataset import load_labeled
from aemt.data.pooling import feature_stats, pool_valid, pool_valid_reference, standardize
from conftest import make_labeled, make_split, write_pickle


@pytest.mark.parametrize("length,target", [(37, 8), (8, 8), (5, 8), (100, 7), (13, 1)])
def test_pool_matches_reference(length, target):
    rng = np.random.default_rng(length)
    n, dim = 40, 3
    lengths = rng.integers(1, length + 1, n)
    x = rng.normal(size=(n, length, dim)).astype(np.float32)
    x[np.arange(length)[None, :] >= lengths[:, None]] = 0
    out, new = pool_valid(x, lengths, target, chunk_elements=7 * target * length)
    np.testing.assert_allclose(out, pool_valid_reference(x, lengths, target), rtol=1e-5, atol=1e-6)
    assert np.array_equal(new, np.minimum(lengths, target))
    assert (out[np.arange(target)[None, :] >= new[:, None]] == 0).all()


def test_padding_does_not_dilute():
    x = np.zeros((1, 10, 1), np.float32)
    x[0, :4] = 2.0  # 4 valid frames of value 2, then padding
    out, new = pool_valid(x, np.array([4]), 2)
    assert out[0, :, 0].tolist() == [2.0, 2.0] and new.tolist() == [2]
    for garbage in (99.0, np.nan, np.inf):  # garbage in padding must not matter either
        x[0, 4:] = garbage
        assert pool_valid(x, np.array([4]), 2)[0][0, :, 0].tolist() == [2.0, 2.0]
        assert pool_valid(x[:, 2:5], np.array([2]), 4)[0][0, :, 0].tolist() == [2.0, 2.0, 0.0, 0.0]


def test_standardize_uses_valid_frames_and_keeps_padding_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(50, 6, 2)).astype(np.float32)
    lengths = rng.integers(1, 7, 50)
    x[np.arange(6)[None, :] >= lengths[:, None]] = 0
    mean, std = feature_stats(x, lengths)
    z = standardize(x, lengths, mean, std)
    valid = np.arange(6)[None, :] < lengths[:, None]
    np.testing.assert_allclose(z[valid].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[valid].std(0), 1, atol=1e-4)
    assert (z[~valid] == 0).all()


def test_load_labeled_pools_and_standardizes_with_train_stats(tmp_path):
    path = write_pickle(tmp_path / "d.pkl", make_labeled())
    data = load_labeled(path, seq_len=4)
    assert data.dims == {"text": 4, "audio": 3, "vision": 2}
    assert data["train"].features["audio"].shape == (6, 4, 3)
    train = data["train"]
    valid = np.arange(4)[None, :] < train.lengths["audio"][:, None]
    np.testing.assert_allclose(train.features["audio"][valid].mean(0), 0, atol=1e-5)
    raw = load_labeled(path, seq_len=4, standardize_features=False)
    mean, std = data.stats["vision"]
    v = raw["test"].lengths["vision"]
    np.testing.assert_allclose(data["test"].features["vision"][0, : v[0]],
                               (raw["test"].features["vision"][0, : v[0]] - mean) / std, rtol=1e-5, atol=1e-6)


def test_cache_second_load_hits_and_matches(tmp_path):
    path = write_pickle(tmp_path / "d.pkl", make_labeled())
    first = load_labeled(path, seq_len=4, cache_dir=tmp_path / "c")
    second = load_labeled(path, seq_len=4, cache_dir=tmp_path / "c")
    assert not first.from_cache and second.from_cache
    for m in ("text", "audio", "vision"):
        np.testing.assert_array_equal(first["valid"].features[m], second["valid"].features[m])
    third = load_labeled(path, seq_len=3, cache_dir=tmp_path / "c")  # other settings: other key
    assert not third.from_cache
    data = make_labeled()
    data["train"]["audio"][0, 0, 0] += 1.0  # changed content: other key
    write_pickle(path, data)
    assert not load_labeled(path, seq_len=4, cache_dir=tmp_path / "c").from_cache


def test_a_file_rewritten_with_its_old_size_and_time_is_not_served_from_the_cache(tmp_path):
    import json
    import os

    path = write_pickle(tmp_path / "d.pkl", make_labeled())
    before = path.stat()
    first = load_labeled(path, seq_len=4, cache_dir=tmp_path / "c")
    data = make_labeled()
    data["train"]["audio"][0, 0, 0] += 1.0  # same size, other content
    write_pickle(path, data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the old modification time
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    second = load_labeled(path, seq_len=4, cache_dir=tmp_path / "c", standardize_features=False)
    assert not second.from_cache
    raw = load_labeled(path, seq_len=4, cache_dir="off", standardize_features=False)
    np.testing.assert_array_equal(second["train"].features["audio"], raw["train"].features["audio"])
    assert not np.array_equal(first["train"].features["audio"], load_labeled(
        path, seq_len=4, cache_dir=tmp_path / "c")["train"].features["audio"])
    assert len(json.loads((tmp_path / "c" / "digests.json").read_text())) == 1  # one key per file


def test_a_damaged_digest_index_is_rehashed_and_never_names_a_folder_outside_the_cache(tmp_path):
    import json

    from aemt.data.cache import cached_digest, file_digest

    path = write_pickle(tmp_path / "d.pkl", make_labeled())
    root = tmp_path / "c"
    key = next(iter(json.loads((cached_digest(path, root), root / "digests.json")[1].read_text())))
    for damaged in ("../../" + "x" * 58, ["list"], None, "ABC"):
        (root / "digests.json").write_text(json.dumps({key: damaged}))
        assert cached_digest(path, root) == file_digest(path)
    (root / "digests.json").write_text("[1, 2]")
    assert cached_digest(path, root) == file_digest(path)


def test_load_for_prediction_reads_every_kind_of_file_once(tmp_path, monkeypatch):
    from aemt.data import mmsa
    from aemt.data.dataset import load_for_prediction
    from aemt.data.safe_pickle import safe_load_pickle

    unpickled = []
    monkeypatch.setattr(mmsa, "safe_load_pickle", lambda path: unpickled.append(path) or safe_load_pickle(path))
    labeled = write_pickle(tmp_path / "labeled.pkl", make_labeled())
    no_labels = {s: {k: v for k, v in part.items() if not k.startswith("regression")}
                 for s, part in make_labeled().items()}
    unlabeled = write_pickle(tmp_path / "unlabeled.pkl", no_labels)  # train/valid/test, no labels: every clip
    mix = make_labeled()
    mix["train_mix"] = {**make_split(n=8, seed=5), "mask": np.array([1, 0, 0, 1, 0, 1, 1, 0])}
    mixed = write_pickle(tmp_path / "mix.pkl", mix)  # a labeled file, read as one
    for path in (labeled, unlabeled, mixed):
        first, again = (load_for_prediction(path, seq_len=4) for _ in range(2))
        assert (first.from_cache, again.from_cache) == (False, True)
        for name, split in first.splits.items():
            for m in ("text", "audio", "vision"):
                np.testing.assert_array_equal(split.features[m], again[name].features[m])
            assert split.ids == again[name].ids
    assert unpickled == [labeled, unlabeled, mixed]
    assert sorted(load_for_prediction(labeled, seq_len=4).splits) == ["test", "train", "valid"]
    assert sorted(load_for_prediction(mixed, seq_len=4).splits) == ["test", "train", "valid"]
    every = load_for_prediction(unlabeled, seq_len=4).splits  # each split, no labels
    assert list(every) == ["train", "valid", "test"]
    for s, split in every.items():
        assert split.ids == list(no_labels[s]["id"]) and split.labels is None
        assert np.array_equal(split.lengths["audio"], np.minimum(no_labels[s]["audio_lengths"], 4))
    del mix["train"]  # no longer a labeled file: only train_mix's unlabeled rows (mask 0)
    (only_mix,) = load_for_prediction(write_pickle(tmp_path / "only_mix.pkl", mix), seq_len=4).splits.values()
    assert only_mix.ids == [mix["train_mix"]["id"][i] for i in (1, 2, 4, 7)]


def test_load_for_prediction_names_a_broken_labeled_file_or_mixed_widths(tmp_path):
    from aemt.data.dataset import load_for_prediction
    from aemt.errors import DataError

    broken = make_labeled()
    broken["train"] = [1, 2, 3]  # still meant as a labeled file: an error, not "every clip of valid and test"
    with pytest.raises(DataError, match="split 'train'.*expected a dict of arrays"):
        load_for_prediction(write_pickle(tmp_path / "broken.pkl", broken), seq_len=4)
    widths = {s: {k: v for k, v in part.items() if not k.startswith("regression")}
              for s, part in make_labeled().items()}
    widths["test"]["vision"] = np.zeros((6, 7, 5), np.float32)  # 2 features elsewhere
    with pytest.raises(DataError, match="split 'test', key 'vision'.*expected feature dim 2.*got 5"):
        load_for_prediction(write_pickle(tmp_path / "widths.pkl", widths), seq_len=4)


@pytest.mark.parametrize("length,target", [(39, 50), (39, 1), (39, 8), (232, 50)])
def test_pooling_temporaries_stay_chunk_sized(length, target):
    """Beyond its output, pooling allocates chunks (of 2**16 elements here), not copies of the input."""
    import tracemalloc

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, length, 768)).astype(np.float32)
    lengths = rng.integers(0, length + 1, 400)
    tracemalloc.start()
    out, _ = pool_valid(x, lengths, target, chunk_elements=1 << 16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak - out.nbytes < 0.05 * x.nbytes, (peak / 2**20, x.nbytes / 2**20)


def test_standardised_splits_are_cached_with_their_statistics(tmp_path):
    """A second load maps the standardised splits and their train statistics: the same values
    as computing them, and nothing cached where a validation split is drawn at random."""
    from aemt.data.dataset import load_unlabeled

    path = write_pickle(tmp_path / "d.pkl", make_labeled())
    fresh = load_labeled(path, seq_len=4, cache_dir="off")
    first, again = (load_labeled(path, seq_len=4) for _ in range(2))
    for data in (first, again):
        for m in ("text", "audio", "vision"):
            assert all(np.array_equal(a, b) for a, b in zip(data.stats[m], fresh.stats[m]))
            for name in ("train", "valid", "test"):
                np.testing.assert_array_equal(data[name].features[m], fresh[name].features[m])
    assert isinstance(again["train"].features["audio"], np.memmap)
    root = tmp_path / "aemt-cache"
    assert sorted(p.name.split("-labeled-")[1] for p in root.iterdir() if p.is_dir()) == [
        "len4-sequence", "len4-sequence-standardized"]
    own = {m: (np.zeros(d, np.float32), np.full(d, 2.0, np.float32)) for m, d in fresh.dims.items()}
    given = load_labeled(path, seq_len=4, stats=own)  # someone else's statistics: used, not cached
    np.testing.assert_array_equal(given["test"].features["audio"], load_labeled(
        path, seq_len=4, standardize_features=False)["test"].features["audio"] / 2)
    unlabeled = {"train": {k: v for k, v in make_split(n=12).items() if not k.startswith("regression")}}
    upath = write_pickle(tmp_path / "u.pkl", unlabeled)
    for seed in (0, 1):
        load_unlabeled(upath, seq_len=4, seed=seed)
    assert not [p for p in root.iterdir() if "-unlabeled-" in p.name and "standardized" in p.name]


@pytest.mark.parametrize("damage", ["empty-npy", "empty-stats", "truncated-stats", "no-stats"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, damage):
    path = write_pickle(tmp_path / "d.pkl", make_labeled())
    fresh = load_labeled(path, seq_len=4, cache_dir="off")
    load_labeled(path, seq_len=4)
    (entry,) = (tmp_path / "aemt-cache").glob("*-standardized")
    target = entry / ("train.audio.npy" if damage == "empty-npy" else "stats.npz")
    if damage == "no-stats":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:100 if damage == "truncated-stats" else 0])
    for _ in range(2):  # served right, then from the rebuilt entry
        data = load_labeled(path, seq_len=4)
        np.testing.assert_array_equal(data["train"].features["audio"], fresh["train"].features["audio"])
        assert all(np.array_equal(a, b) for a, b in zip(data.stats["audio"], fresh.stats["audio"]))
    assert isinstance(data["train"].features["audio"], np.memmap)


def test_warm_cache_writes_the_standardised_splits_that_runs_then_map(tmp_path):
    from aemt.data.cache import CACHE_VERSION
    from aemt.data.dataset import load_unlabeled, warm_cache

    labeled = write_pickle(tmp_path / "l.pkl", make_labeled())
    unlabeled = write_pickle(tmp_path / "u.pkl", {s: {k: v for k, v in make_split(seed=i).items() if "regression" not in k}
                                                  for i, s in enumerate(("train", "valid"))})
    warm_cache(labeled, "labeled", seq_len=4, standardize=True)
    warm_cache(unlabeled, "unlabeled", seq_len=4, standardize=True)
    names = sorted(p.name.split(f"-v{CACHE_VERSION}-")[1] for p in (tmp_path / "aemt-cache").iterdir() if p.is_dir())
    assert names == ["labeled-len4-sequence", "labeled-len4-sequence-standardized",
                     "unlabeled-len4-sequence", "unlabeled-len4-sequence-standardized"]
    for data in (load_labeled(labeled, seq_len=4, metrics="sims"), load_unlabeled(unlabeled, seq_len=4, seed=3)):
        assert isinstance(data["train"].features["vision"], np.memmap) and data.stats is not None
