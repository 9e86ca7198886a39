"""Every malformed input raises one DataError that names file, split, key, expected and actual."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from aemt.data.dataset import load_labeled, load_unlabeled
from aemt.data.mmsa import read_labeled, read_unlabeled
from aemt.errors import DataError
from conftest import make_labeled, make_split, write_pickle


def _bad(tmp_path, mutate, reader=read_labeled):
    data = make_labeled()
    mutate(data)
    path = write_pickle(tmp_path / "bad.pkl", data)
    with pytest.raises(DataError) as info:
        reader(path)
    return str(info.value)


def test_valid_file_loads(tmp_path):
    splits = read_labeled(write_pickle(tmp_path / "ok.pkl", make_labeled()))
    assert set(splits) == {"train", "valid", "test"}
    s = splits["train"]
    assert s.features["audio"].shape == (6, 9, 3) and s.labels["T"].shape == (6,)
    assert not s.unimodal_from_multimodal
    assert s.lengths["text"].tolist() == [int(v) for v in make_split(seed=0)["text_bert"][:, 1].sum(1)]


def test_missing_split(tmp_path):
    msg = _bad(tmp_path, lambda d: d.pop("valid"))
    assert "split 'valid'" in msg and "bad.pkl" in msg and "missing split" in msg


def test_missing_key(tmp_path):
    msg = _bad(tmp_path, lambda d: d["test"].pop("vision"))
    assert "split 'test'" in msg and "key 'vision'" in msg and "missing key" in msg


def test_missing_label_key(tmp_path):
    msg = _bad(tmp_path, lambda d: d["train"].pop("regression_labels"))
    assert "key 'regression_labels'" in msg


def test_inconsistent_n(tmp_path):
    msg = _bad(tmp_path, lambda d: d["train"].update(audio=d["train"]["audio"][:5]))
    assert "key 'audio'" in msg and "expected 6" in msg and "got 5" in msg


def test_inconsistent_n_labels(tmp_path):
    msg = _bad(tmp_path, lambda d: d["valid"].update(regression_labels_A=np.zeros(4, np.float32)))
    assert "key 'regression_labels_A'" in msg and "expected 6" in msg and "got 4" in msg


def test_wrong_rank(tmp_path):
    msg = _bad(tmp_path, lambda d: d["train"].update(text=d["train"]["text"][:, 0]))
    assert "key 'text'" in msg and "expected rank 3" in msg and "(6, 4)" in msg


def test_mismatched_dims_between_splits(tmp_path):
    msg = _bad(tmp_path, lambda d: d["test"].update(audio=np.zeros((6, 9, 5), np.float32)))
    assert "split 'test'" in msg and "key 'audio'" in msg and "expected feature dim 3" in msg and "got 5" in msg


def test_length_longer_than_padded(tmp_path):
    def mutate(d):
        d["train"]["audio_lengths"][2] = 10
    msg = _bad(tmp_path, mutate)
    assert "key 'audio_lengths'" in msg and "[1, 9]" in msg and "got 10 at clip 2" in msg


def test_length_below_one(tmp_path):
    def mutate(d):
        d["valid"]["vision_lengths"][0] = 0
    msg = _bad(tmp_path, mutate)
    assert "key 'vision_lengths'" in msg and "got 0 at clip 0" in msg


def test_empty_split(tmp_path):
    def mutate(d):
        d["test"] = {k: (v[:0] if hasattr(v, "shape") else v[:0]) for k, v in d["test"].items()}
    msg = _bad(tmp_path, mutate)
    assert "split 'test'" in msg and "empty split" in msg


def test_labels_out_of_range(tmp_path):
    data = make_labeled()
    data["train"]["regression_labels"][3] = 1.5
    path = write_pickle(tmp_path / "bad.pkl", data)
    with pytest.raises(DataError, match=r"expected labels in \[-1, 1\], got 1.5 at clip 3"):
        load_labeled(path, metrics="sims", seq_len=4)
    read_labeled(path)  # within MOSEI's [-3, 3]: accepted


def test_nan_label(tmp_path):
    msg = _bad(tmp_path, lambda d: d["train"]["regression_labels_V"].__setitem__(0, np.nan))
    assert "key 'regression_labels_V'" in msg and "nan" in msg


def test_not_a_pickle(tmp_path):
    path = tmp_path / "notes.pkl"
    path.write_text("this is not a pickle")
    with pytest.raises(DataError, match="notes.pkl.*not a readable pickle"):
        read_labeled(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_labeled(tmp_path / "nope.pkl")


def test_top_level_not_dict(tmp_path):
    with pytest.raises(DataError, match="expected a dict of splits"):
        read_labeled(write_pickle(tmp_path / "list.pkl", [1, 2, 3]))


def test_nonfinite_features_zeroed_and_counted(tmp_path):
    data = make_labeled()
    data["train"]["audio"][0, 0, :2] = -np.inf
    data["train"]["vision"][1, 0, 0] = np.nan
    path = write_pickle(tmp_path / "inf.pkl", data)
    with pytest.warns(UserWarning, match=r"replaced non-finite.*audio: 2, vision: 1"):
        splits = read_labeled(path)
    assert splits["train"].nonfinite == {"text": 0, "audio": 2, "vision": 1}
    assert splits["train"].features["audio"][0, 0, :2].tolist() == [0.0, 0.0]
    assert np.isfinite(splits["train"].features["vision"]).all()


def test_mosei_like_fills_unimodal_labels(tmp_path):
    data = {s: make_split(seed=i, unimodal=False, scale=3.0) for i, s in enumerate(("train", "valid", "test"))}
    splits = read_labeled(write_pickle(tmp_path / "mosei.pkl", data))
    s = splits["train"]
    assert s.unimodal_from_multimodal
    assert np.array_equal(s.labels["T"], s.labels["M"]) and np.array_equal(s.labels["V"], s.labels["M"])


@pytest.mark.parametrize("drop, missing", [
    ("A", "regression_labels_A"), ("TV", "regression_labels_T, regression_labels_V"),
], ids=["no-A", "no-T-V"])
def test_some_but_not_all_unimodal_labels_are_an_error(tmp_path, drop, missing):
    def mutate(d):
        for name in drop:
            d["train"].pop(f"regression_labels_{name}")
    msg = _bad(tmp_path, mutate)
    assert f"split 'train', key 'regression_labels_{drop[0]}'" in msg and f"missing key(s) {missing}:" in msg
    assert "expected all three unimodal labels" in msg and "got only regression_labels_" in msg


def test_splits_that_differ_in_unimodal_labels_warn_once(tmp_path):
    data = make_labeled()
    for split in ("valid", "test"):
        for name in "TAV":
            data[split].pop(f"regression_labels_{name}")
    with pytest.warns(UserWarning) as record:
        splits = read_labeled(write_pickle(tmp_path / "mixed.pkl", data))
    ours = [str(w.message) for w in record if w.category is UserWarning]
    assert len(ours) == 1, ours
    msg = ours[0]
    assert "split(s) 'valid', 'test' have no unimodal labels" in msg and "'train' have them" in msg
    assert "fall back to the multimodal label" in msg
    assert not splits["train"].unimodal_from_multimodal and splits["test"].unimodal_from_multimodal
    for _ in range(2):  # the first load reads the file, the second the cache: both say so
        with pytest.warns(UserWarning, match=r"split\(s\) 'valid', 'test' have no unimodal labels"):
            load_labeled(tmp_path / "mixed.pkl", seq_len=3, cache_dir=tmp_path / "c")
    mosei = {s: make_split(seed=i, unimodal=False, scale=3.0) for i, s in enumerate(("train", "valid", "test"))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none at all (MOSI/MOSEI): silent
        read_labeled(write_pickle(tmp_path / "mosei.pkl", mosei))


def test_aligned_file_without_lengths(tmp_path):
    data = make_labeled()
    for part in data.values():
        part.pop("audio_lengths"), part.pop("vision_lengths")
    s = read_labeled(write_pickle(tmp_path / "aligned.pkl", data))["train"]
    assert (s.lengths["audio"] == 9).all() and (s.lengths["vision"] == 7).all()


def test_unlabeled_separate_file_and_train_mix(tmp_path):
    part = make_split(n=10)
    for k in [k for k in part if k.startswith("regression")]:
        part.pop(k)
    splits = read_unlabeled(write_pickle(tmp_path / "u.pkl", {"train": part}))
    assert splits["train"].n == 10 and splits["train"].labels is None

    mix = make_split(n=8)
    mix["mask"] = np.array([1, 1, 0, 0, 0, 1, 0, 0])
    data = make_labeled()
    data["train_mix"] = mix
    splits = read_unlabeled(write_pickle(tmp_path / "mix.pkl", data))
    assert splits["train"].ids == [mix["id"][i] for i in (2, 3, 4, 6, 7)]
    data = load_unlabeled(tmp_path / "mix.pkl", seq_len=3, valid_fraction=0.2)
    assert data["train"].n + data["valid"].n == 5 and data["valid"].n == 1


def test_unlabeled_reading_of_a_labeled_file_never_takes_test_clips(tmp_path):
    path = write_pickle(tmp_path / "l.pkl", make_labeled())
    splits = read_unlabeled(path)
    assert set(splits) == {"train", "valid"}
    test_ids = set(make_split(seed=2)["id"])
    data = load_unlabeled(path, seq_len=3)
    assert not test_ids & (set(data["train"].ids) | set(data["valid"].ids))


def test_pretraining_reads_every_split_of_a_labeled_file_but_test(tmp_path):
    data = make_labeled()
    data["extra"] = make_split(n=4, seed=7)
    path = write_pickle(tmp_path / "l.pkl", data)
    assert list(read_unlabeled(path)) == ["train", "valid", "extra"]
    loaded = load_unlabeled(path, seq_len=3)
    assert loaded["train"].ids == make_split(seed=0)["id"] + make_split(n=4, seed=7)["id"]
    assert loaded["valid"].ids == make_split(seed=1)["id"]
    no_labels = {s: {k: v for k, v in part.items() if not k.startswith("regression")} for s, part in data.items()}
    with pytest.warns(UserWarning, match="'test' clips are left out"):
        assert list(read_unlabeled(write_pickle(tmp_path / "u.pkl", no_labels))) == ["train", "valid", "extra"]


def test_a_file_with_train_valid_test_but_no_labels_warns_that_its_test_clips_are_left_out(tmp_path):
    no_labels = {s: {k: v for k, v in part.items() if not k.startswith("regression")}
                 for s, part in make_labeled().items()}
    with pytest.warns(UserWarning, match=r"'train', 'valid' and 'test' but no labels.*'test' clips are left out"):
        splits = read_unlabeled(write_pickle(tmp_path / "u.pkl", no_labels))
    assert set(splits) == {"train", "valid"}
    no_labels["more"] = no_labels.pop("test")  # renamed, as the warning says: every clip is used
    assert set(read_unlabeled(write_pickle(tmp_path / "r.pkl", no_labels))) == {"train", "valid", "more"}


def test_label_range_checked_on_cached_loads_too(tmp_path):
    data = make_labeled()
    data["test"]["regression_labels"][1] = 2.5  # fine for MOSEI, out of range for SIMS
    path = write_pickle(tmp_path / "m.pkl", data)
    load_labeled(path, seq_len=4, metrics="mosei", cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"split 'test', key 'regression_labels': expected labels in \[-1, 1\]"):
        load_labeled(path, seq_len=4, metrics="sims", cache_dir=tmp_path / "c")
