"""Malformed MMSA files found by an audit: each gives one DataError naming file, split, key,
expected and actual value (never a numpy traceback, never silently wrong numbers), and
`aemt data inspect` reports incomplete labeled files and `train_mix` splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from aemt.cli import app
from aemt.data.dataset import load_unlabeled
from aemt.data.mmsa import read_labeled, read_unlabeled
from aemt.errors import DataError
from conftest import make_labeled, make_split, write_pickle

runner = CliRunner()


def _set(split: str, key: str, value):
    return lambda d: d[split].__setitem__(key, value(d[split]) if callable(value) else value)


def _mask_row(value):
    def mutate(part):
        bert = part["text_bert"].astype(np.float64)
        bert[:, 1, :] = value(bert[:, 1, :])
        return bert
    return mutate


def _unlabeled(n: int = 8) -> dict:
    part = make_split(n=n)
    for key in [k for k in part if k.startswith("regression")]:
        part.pop(key)
    return part


def _with_train_mix(mask) -> dict:
    data = make_labeled()
    data["train_mix"] = {**make_split(n=8), "mask": np.asarray(mask)}
    return data


def _error(tmp_path, data, reader) -> str:
    path = write_pickle(tmp_path / "bad.pkl", data)
    with pytest.raises(DataError) as info:
        reader(path)
    assert "bad.pkl" in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("mutate, expected", [
    (_set("train", "id", 5), ["key 'id'", "expected a sequence of 6 strings", "got 5 (int)"]),
    (_set("train", "raw_text", None), ["key 'raw_text'", "expected a sequence of 6 strings", "got None"]),
    (_set("train", "text_bert", lambda p: p["text_bert"].astype(str)),
     ["key 'text_bert'", "expected real numbers", "got dtype <U"]),
    (_set("train", "audio", lambda p: p["audio"].astype(np.complex64) * 1j),
     ["key 'audio'", "expected real numbers", "got dtype complex64"]),
    (_set("test", "vision", lambda p: p["vision"] + 0j), ["split 'test', key 'vision'", "got dtype complex64"]),
    (_set("train", "regression_labels", lambda p: p["regression_labels"] + 0j),
     ["key 'regression_labels'", "got dtype complex64"]),
    (_set("train", "audio_lengths", lambda p: np.asarray(p["audio_lengths"]) + 0j),
     ["key 'audio_lengths'", "got dtype complex128"]),
    (_set("train", "vision", lambda p: p["vision"] > 0), ["key 'vision'", "expected real numbers", "got dtype bool"]),
    (_set("valid", "regression_labels", lambda p: p["regression_labels"] > 0),
     ["split 'valid', key 'regression_labels'", "got dtype bool"]),
    (_set("train", "text_bert", _mask_row(lambda row: row * np.nan)),
     ["key 'text_bert'", "attention-mask values 0 or 1", "got nan at clip 0, token 0"]),
    (_set("train", "text_bert", _mask_row(lambda row: -row)), ["key 'text_bert'", "got -1 at clip 0"]),
    (_set("train", "text_bert", _mask_row(lambda row: row * 2)), ["key 'text_bert'", "got 2 at clip 0"]),
    (_set("train", "audio_lengths", [1e20] * 6), ["key 'audio_lengths'", "got 1e+20 at clip 0"]),
    (_set("valid", "vision_lengths", [2.5] * 6), ["key 'vision_lengths'", "got 2.5 at clip 0"]),
    (lambda d: d.__setitem__(0, d.pop("train")),
     ["split 'train'", "missing split", "got ['valid', 'test', 0]", "split names must be strings"]),
    (_set("train", "text_bert", lambda p: p["text_bert"][:-1]),
     ["split 'train', key 'text_bert'", "expected 6 entries (as in 'text')", "got 5"]),
    (_set("valid", "text_bert", lambda p: p["text_bert"][:, 1]),
     ["split 'valid', key 'text_bert'", "expected rank 3", "got shape (6, 5)"]),
    (_set("train", "text_bert", lambda p: p["text_bert"][:, :1]),
     ["key 'text_bert'", "expected at least 2 rows", "got shape (6, 1, 5)"]),
    (_set("test", "text_bert", lambda p: p["text_bert"][:, :, :4]),
     ["split 'test', key 'text_bert'", "expected 5 tokens per row", "got 4"]),
], ids=["id-int", "raw_text-none", "text_bert-str", "audio-complex", "vision-complex-0j",
        "labels-complex", "lengths-complex", "vision-bool", "labels-bool", "mask-nan", "mask-negative", "mask-2",
        "lengths-1e20", "lengths-fraction", "split-key-int", "text_bert-short", "text_bert-rank2",
        "text_bert-no-mask-row", "text_bert-tokens"])
def test_labeled_file_errors(tmp_path, mutate, expected):
    data = make_labeled()
    mutate(data)
    msg = _error(tmp_path, data, read_labeled)
    assert all(part in msg for part in expected), msg


@pytest.mark.parametrize("data, expected", [
    ({"valid": _unlabeled(), 1: _unlabeled()}, ["expected split names to be strings, got 1 (int)"]),
    (_with_train_mix([1, 1, 0, 0, 0, 1, 0]), ["split 'train_mix', key 'mask'", "expected 8 entries", "got 7"]),
    (_with_train_mix([1, 1, 0, 0, 0.5, 1, 0, 0]),
     ["key 'mask'", "expected 1 (labeled) or 0 (unlabeled), got 0.5 at clip 4"]),
    (_with_train_mix([1, 1, 0, 0, 2, 1, 0, np.nan]), ["key 'mask'", "got 2 at clip 4 (2 such entries)"]),
    (_with_train_mix(np.array(list("11000100"))), ["key 'mask'", "expected real numbers"]),
], ids=["split-key-int", "mask-short", "mask-half", "mask-2-nan", "mask-str"])
def test_unlabeled_file_errors(tmp_path, data, expected):
    msg = _error(tmp_path, data, read_unlabeled)
    assert all(part in msg for part in expected), msg


def test_pretraining_file_with_only_a_valid_split(tmp_path):
    msg = _error(tmp_path, {"valid": _unlabeled()}, lambda p: load_unlabeled(p, seq_len=3))
    assert "every split except 'valid'" in msg and "got only splits ['valid']" in msg


def test_pretraining_never_reads_the_test_clips_of_an_incomplete_labeled_file(tmp_path):
    data = make_labeled()
    data.pop("valid")
    splits = read_unlabeled(write_pickle(tmp_path / "l.pkl", data))
    assert set(splits) == {"train"}


@pytest.mark.parametrize("mutate, gaps", [
    (lambda d: d.pop("valid"), {"missing_splits": ["valid"], "missing_keys": {}}),
    (lambda d: d["test"].pop("regression_labels"), {"missing_splits": [], "missing_keys": {"test": ["regression_labels"]}}),
], ids=["no-valid", "test-without-labels"])
def test_inspect_reports_an_incomplete_labeled_file(tmp_path, mutate, gaps):
    data = make_labeled()
    mutate(data)
    path = str(write_pickle(tmp_path / "l.pkl", data))
    result = runner.invoke(app, ["data", "inspect", path, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["labeled_file_incomplete"] == gaps and "incomplete labeled file" in report["warnings"][0]
    table = runner.invoke(app, ["data", "inspect", path])
    assert table.exit_code == 0 and "warning: incomplete labeled file" in table.output


def test_inspect_complete_files_have_no_warning(tmp_path):
    for name, data in (("l.pkl", make_labeled()), ("u.pkl", {"train": _unlabeled()})):
        result = runner.invoke(app, ["data", "inspect", str(write_pickle(tmp_path / name, data)), "--json"])
        report = json.loads(result.output)
        assert report["labeled_file_incomplete"] is None and report["warnings"] == []


def test_inspect_shows_train_mix(tmp_path):
    path = str(write_pickle(tmp_path / "mix.pkl", _with_train_mix([1, 1, 0, 0, 0, 1, 0, 0])))
    result = runner.invoke(app, ["data", "inspect", path, "--json"])
    assert result.exit_code == 0, result.output
    mix = json.loads(result.output)["splits"]["train_mix"]
    assert mix["clips"] == 8 and mix["unlabeled_clips"] == 5 and set(mix["modalities"]) == {"text", "audio", "vision"}
    table = runner.invoke(app, ["data", "inspect", path])
    assert table.exit_code == 0 and "train_mix: 5 of 8 clips unlabeled" in table.output


def test_inspect_lists_the_extra_splits_of_a_labeled_file(tmp_path):
    data = make_labeled()
    data["extra"] = make_split(n=4, seed=7)
    path = str(write_pickle(tmp_path / "l.pkl", data))
    result = runner.invoke(app, ["data", "inspect", path, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert list(report["splits"]) == ["train", "valid", "test", "extra"]
    assert report["splits"]["extra"]["clips"] == 4 and report["pretraining_only_splits"] == ["extra"]
    assert "label_histograms" not in report["splits"]["extra"] and report["warnings"] == []
    table = runner.invoke(app, ["data", "inspect", path])
    assert table.exit_code == 0 and "read by pre-training only" in table.output and "extra (4 clips)" in table.output


def test_inspect_names_extra_splits_that_a_train_mix_file_leaves_unread(tmp_path):
    data = _with_train_mix([1, 1, 0, 0, 0, 1, 0, 0])
    data["extra"] = make_split(n=4, seed=7)
    report = json.loads(runner.invoke(app, ["data", "inspect", str(write_pickle(tmp_path / "m.pkl", data)),
                                            "--json"]).output)
    assert report["pretraining_only_splits"] == [] and "'extra' are read by nothing" in report["warnings"][0]


def test_inspect_names_the_splits_whose_unimodal_labels_fall_back(tmp_path):
    data = make_labeled()
    for name in "TAV":
        data["test"].pop(f"regression_labels_{name}")
    path = str(write_pickle(tmp_path / "l.pkl", data))
    report = json.loads(runner.invoke(app, ["data", "inspect", path, "--json"]).output)
    assert report["unimodal_from_multimodal_splits"] == ["test"]
    assert "split(s) 'test' have no unimodal labels" in report["warnings"][0]
    table = runner.invoke(app, ["data", "inspect", path]).output
    assert "T/A/V absent in split(s) test" in table and "warning:" in table


def test_inspect_refuses_partial_unimodal_labels(tmp_path):
    data = make_labeled()
    data["train"].pop("regression_labels_A")
    result = runner.invoke(app, ["data", "inspect", str(write_pickle(tmp_path / "l.pkl", data))])
    assert isinstance(result.exception, DataError) and "key 'regression_labels_A'" in str(result.exception)


def test_inspect_refuses_a_bad_train_mix_mask(tmp_path):
    path = str(write_pickle(tmp_path / "mix.pkl", _with_train_mix([1, 1, 0, 0, 0, 1, 0])))
    result = runner.invoke(app, ["data", "inspect", path])
    assert isinstance(result.exception, DataError) and "key 'mask'" in str(result.exception)


@pytest.mark.parametrize("sub", ["", "sub"])
def test_synth_into_an_existing_file(tmp_path, sub):
    existing = tmp_path / "labeled.pkl"
    existing.write_bytes(b"keep me")
    result = runner.invoke(app, ["data", "synth", str(existing / sub), "--n-train", "4"])
    assert isinstance(result.exception, DataError), result.exception
    assert f"'{existing}' is an existing file" in str(result.exception)
    assert existing.read_bytes() == b"keep me"


def test_clips_without_a_transcript_get_empty_text_and_a_warning(tmp_path):
    data = make_labeled()
    data["valid"]["raw_text"] = data["valid"]["raw_text"][:3] + [None, float("nan")] + data["valid"]["raw_text"][5:]
    with pytest.warns(UserWarning, match=r"split 'valid', key 'raw_text': 2 clips without a transcript .* clip 3"):
        splits = read_labeled(write_pickle(tmp_path / "f.pkl", data))
    assert splits["valid"].raw_text[3:5] == ["", ""] and splits["valid"].raw_text[2] == data["valid"]["raw_text"][2]


def test_a_split_that_is_not_a_dict_is_named_for_pretraining(tmp_path):
    data = make_labeled()
    data["train"] = [1, 2, 3]
    msg = _error(tmp_path, data, read_unlabeled)
    assert "split 'train'" in msg and "expected a dict of arrays, got list" in msg


def test_a_modality_without_one_finite_value_is_an_error(tmp_path):
    data = make_labeled()
    data["train"]["audio"] = np.full_like(data["train"]["audio"], np.nan)
    msg = _error(tmp_path, data, read_labeled)
    assert "split 'train', key 'audio'" in msg and "expected finite feature values" in msg and "(all of them)" in msg


def _without_labels(data: dict) -> dict:
    for part in data.values():
        for key in [k for k in part if k.startswith("regression_labels")]:
            del part[key]
    return data


def _no_transcript(data: dict) -> dict:
    data["valid"]["raw_text"][1] = None
    return data


def _non_finite(data: dict) -> dict:
    data["train"]["audio"][0, 0, 0] = -np.inf
    return data


@pytest.mark.parametrize("kind, spoil, warning", [
    ("labeled", _non_finite, r"split 'train': replaced non-finite feature values by 0 \(audio: 1\)"),
    ("unlabeled", _non_finite, r"split 'train': replaced non-finite feature values by 0 \(audio: 1\)"),
    ("labeled", _no_transcript, r"split 'valid', key 'raw_text': 1 clips without a transcript"),
    ("unlabeled", _without_labels, r"no labels: it is read as a labeled file, so its 'test' clips are left out"),
])
def test_a_data_warning_comes_again_from_the_cache(tmp_path, kind, spoil, warning):
    path = write_pickle(tmp_path / "f.pkl", spoil(make_labeled()))
    from aemt.data.dataset import load_labeled

    load = load_labeled if kind == "labeled" else load_unlabeled
    for hit in (False, True):  # the second load is a cache hit
        with pytest.warns(UserWarning, match=warning):
            data = load(path, seq_len=3, cache_dir=tmp_path / "cache")
        assert data.from_cache is hit


def test_an_unwritable_cache_is_named_and_the_load_goes_on(tmp_path):
    from aemt.data.dataset import load_labeled

    path = write_pickle(tmp_path / "f.pkl", make_labeled())
    blocker = tmp_path / "cache"
    blocker.write_text("a file, not a folder")
    with pytest.warns(UserWarning, match=rf"cannot write the data cache under '{blocker}.*running without it"):
        data = load_labeled(path, seq_len=3, cache_dir=blocker)
    assert data["train"].n > 0 and not data.from_cache and blocker.read_text() == "a file, not a folder"


def test_a_missing_length_key_beside_a_present_one_is_named(tmp_path):
    data = make_labeled()
    del data["train"]["audio_lengths"]
    with pytest.warns(UserWarning, match=r"split 'train': missing key 'audio_lengths' while 'vision_lengths' is "
                                         r"present; every clip's audio counts as \d+ valid frames"):
        splits = read_labeled(write_pickle(tmp_path / "f.pkl", data))
    assert (splits["train"].lengths["audio"] == data["train"]["audio"].shape[1]).all()


def test_repeated_clip_ids_are_named(tmp_path):
    data = make_labeled()
    data["test"]["id"][4] = data["test"]["id"][1]
    with pytest.warns(UserWarning, match=r"split 'test', key 'id': clip id '.+' appears at clips 1 and 4 \(1 repeated"):
        read_labeled(write_pickle(tmp_path / "f.pkl", data))


def test_a_cache_hit_names_the_file_that_was_loaded(tmp_path):
    """Copies of one file share a cache entry; its warnings name the copy being read."""
    import shutil

    from aemt.data.dataset import load_labeled

    first = write_pickle(tmp_path / "a.pkl", _non_finite(make_labeled()))
    copy = Path(shutil.copy(first, tmp_path / "b.pkl"))
    with pytest.warns(UserWarning, match="a.pkl"):
        load_labeled(first, seq_len=3, cache_dir=tmp_path / "cache")
    with pytest.warns(UserWarning) as caught:
        assert load_labeled(copy, seq_len=3, cache_dir=tmp_path / "cache").from_cache
    assert [str(w.message) for w in caught if "non-finite" in str(w.message)] == [
        f"file '{copy}', split 'train': replaced non-finite feature values by 0 (audio: 1)"]


def test_inspect_reports_repeated_ids_and_a_missing_length_key(tmp_path):
    from aemt.evaluation.inspect import inspect_file

    data = make_labeled()
    data["test"]["id"][4] = data["test"]["id"][1]
    del data["train"]["audio_lengths"]
    found = inspect_file(write_pickle(tmp_path / "f.pkl", data))["warnings"]
    assert any("key 'id': clip id" in w for w in found) and any("missing key 'audio_lengths'" in w for w in found)


def test_a_label_out_of_range_names_the_multimodal_key_also_from_the_cache(tmp_path):
    from aemt.data.dataset import load_labeled

    data = make_labeled()
    for part in data.values():  # MOSEI-like: only M, in [-3, 3]; T/A/V become copies of it
        part["regression_labels"] = part["regression_labels"] * 0 + 2.0
        for k in "TAV":
            del part[f"regression_labels_{k}"]
    path = write_pickle(tmp_path / "f.pkl", data)
    load_labeled(path, seq_len=3, cache_dir=tmp_path / "cache", metrics="mosei")  # fills the cache
    with pytest.raises(DataError, match=r"key 'regression_labels': expected labels in \[-1, 1\], got 2"):
        load_labeled(path, seq_len=3, cache_dir=tmp_path / "cache", metrics="sims")
