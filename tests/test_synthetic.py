"""Tests of the synthetic MMSA-layout generator (aemt.data.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest

from aemt.data.safe_pickle import safe_load_pickle
from aemt.data.synthetic import COUNTS, SHAPES, make_synthetic, write_synthetic
from aemt.errors import DataError

FEATURES = ("text", "audio", "vision")
LABEL_KEYS = ("regression_labels", "regression_labels_T", "regression_labels_A",
              "regression_labels_V", "classification_labels")
SMALL_N = dict(n_train=40, n_valid=12, n_test=15, n_unlabeled=30)


@pytest.fixture(scope="module")
def sims_small() -> tuple[dict, dict]:
    return make_synthetic("sims2", "small", seed=0)


@pytest.fixture(scope="module")
def mosei_small() -> tuple[dict, dict]:
    return make_synthetic("mosei", "small", seed=0, **SMALL_N)


def _text_lengths(split: dict) -> np.ndarray:
    return split["text_bert"][:, 1].sum(axis=1).astype(int)


def _all_splits(data: tuple[dict, dict]):
    labeled, unlabeled = data
    for name, split in labeled.items():
        yield name, split, True
    for name, split in unlabeled.items():
        yield name, split, False


@pytest.mark.parametrize("preset", ["sims2", "mosei"])
def test_keys_shapes_dtypes(preset: str, sims_small, mosei_small) -> None:
    data = sims_small if preset == "sims2" else mosei_small
    labeled, unlabeled = data
    assert set(labeled) == {"train", "valid", "test"} and set(unlabeled) == {"train", "valid"}
    counts = COUNTS[(preset, "small")] if preset == "sims2" else {
        "train": 40, "valid": 12, "test": 15}
    for name in ("train", "valid", "test"):
        assert len(labeled[name]["id"]) == counts[name]
    n_unl = COUNTS[(preset, "small")]["unlabeled"] if preset == "sims2" else 30
    assert len(unlabeled["train"]["id"]) + len(unlabeled["valid"]["id"]) == n_unl
    assert len(unlabeled["valid"]["id"]) == round(0.1 * n_unl)
    shapes = SHAPES[(preset, "small")]
    base = {"id", "raw_text", "text", "text_bert", "audio", "vision", "audio_lengths", "vision_lengths"}
    for _, split, is_labeled in _all_splits(data):
        n = len(split["id"])
        expected = set(base)
        if is_labeled:
            expected |= {"regression_labels", "classification_labels"}
            if preset == "sims2":
                expected |= {"regression_labels_T", "regression_labels_A", "regression_labels_V"}
        assert set(split) == expected
        for m in FEATURES:
            assert split[m].shape == (n, *shapes[m]) and split[m].dtype == np.float32
        assert split["text_bert"].shape == (n, 3, shapes["text"][0])
        assert split["text_bert"].dtype == np.float32
        assert not split["text_bert"][:, 2].any()
        for key in ("audio_lengths", "vision_lengths"):
            assert isinstance(split[key], list) and all(type(x) is int for x in split[key])
        assert all(isinstance(s, str) and s for s in split["raw_text"]) and len(split["raw_text"]) == n
        if is_labeled:
            for key in expected & set(LABEL_KEYS):
                assert split[key].shape == (n,) and split[key].dtype == np.float32


@pytest.mark.parametrize("preset", ["sims2", "mosei"])
def test_lengths_and_zero_padding(preset: str, sims_small, mosei_small) -> None:
    data = sims_small if preset == "sims2" else mosei_small
    shapes = SHAPES[(preset, "small")]
    for _, split, _ in _all_splits(data):
        lengths = {"text": _text_lengths(split), "audio": np.array(split["audio_lengths"]),
                   "vision": np.array(split["vision_lengths"])}
        mask = split["text_bert"][:, 1]
        # the attention mask is ones then zeros
        assert np.array_equal(mask, (np.arange(mask.shape[1]) < lengths["text"][:, None]).astype(np.float32))
        for m in FEATURES:
            length = shapes[m][0]
            assert lengths[m].min() >= 1 and lengths[m].max() <= length
            assert len(np.unique(lengths[m])) > 1
            pad = np.arange(length)[None, :] >= lengths[m][:, None]
            assert np.all(split[m][pad] == 0.0)
            assert np.all(np.abs(split[m][~pad]).sum(axis=-1) > 0)     # valid frames carry data
            assert np.isfinite(split[m]).all()


def test_labels_range_and_grid(sims_small, mosei_small) -> None:
    for split in sims_small[0].values():
        for key in LABEL_KEYS[:4]:
            y = split[key]
            assert y.min() >= -1.0 - 1e-6 and y.max() <= 1.0 + 1e-6
            assert np.allclose(y * 5, np.round(y * 5), atol=1e-4)
        y = split["regression_labels"]
        cls = np.where(y < -0.1, 0, np.where(y > 0.1, 2, 1))
        assert np.array_equal(split["classification_labels"], cls.astype(np.float32))
    for split in mosei_small[0].values():
        y = split["regression_labels"]
        assert y.min() >= -3.0 - 1e-6 and y.max() <= 3.0 + 1e-6
        assert np.allclose(y * 3, np.round(y * 3), atol=1e-4)
        assert not any(k in split for k in LABEL_KEYS[1:4])
    train = sims_small[0]["train"]
    assert len(np.unique(train["regression_labels"])) >= 7
    assert set(np.unique(train["classification_labels"])) == {0.0, 1.0, 2.0}


def test_multimodal_differs_from_text(sims_small) -> None:
    train = sims_small[0]["train"]
    y, t = train["regression_labels"], train["regression_labels_T"]
    assert np.mean(y != t) >= 0.2
    # unimodal labels are correlated but not equal
    for key in ("regression_labels_A", "regression_labels_V"):
        r = np.corrcoef(t, train[key])[0, 1]
        assert 0.2 < r < 0.9


def test_ids_unique_across_files(sims_small) -> None:
    ids = [i for _, split, _ in _all_splits(sims_small) for i in split["id"]]
    assert len(ids) == len(set(ids))
    assert all(i.startswith("video_") and "$_$" in i for i in ids)


def test_determinism() -> None:
    a = make_synthetic("sims2", "small", seed=3, **SMALL_N)
    b = make_synthetic("sims2", "small", seed=3, **SMALL_N)
    c = make_synthetic("sims2", "small", seed=4, **SMALL_N)
    for (name, sa, _), (_, sb, _), (_, sc, _) in zip(_all_splits(a), _all_splits(b), _all_splits(c)):
        for key in sa:
            if isinstance(sa[key], np.ndarray):
                assert np.array_equal(sa[key], sb[key]), (name, key)
            else:
                assert sa[key] == sb[key], (name, key)
        for m in FEATURES:
            assert not np.array_equal(sa[m], sc[m])


def _mean_features(split: dict) -> np.ndarray:
    lengths = (_text_lengths(split), np.array(split["audio_lengths"]), np.array(split["vision_lengths"]))
    return np.concatenate([split[m].sum(axis=1) / n[:, None] for m, n in zip(FEATURES, lengths)], axis=1)


def test_ridge_on_time_averages_is_informative_but_imperfect(sims_small) -> None:
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    labeled = sims_small[0]
    x_train, x_test = _mean_features(labeled["train"]), _mean_features(labeled["test"])
    scaler = StandardScaler().fit(x_train)
    model = Ridge(alpha=10.0).fit(scaler.transform(x_train), labeled["train"]["regression_labels"])
    pred = model.predict(scaler.transform(x_test))
    r = np.corrcoef(pred, labeled["test"]["regression_labels"])[0, 1]
    assert 0.2 < r < 0.9, r


def test_context_makes_swaps_detectable(sims_small) -> None:
    """The clip context shows in every modality: context estimates from the text and vision
    time averages agree for the same clip and not for a vision swapped in from another clip."""
    split = sims_small[1]["train"]
    feats = _mean_features(split)
    dt, da = SHAPES[("sims2", "small")]["text"][1], SHAPES[("sims2", "small")]["audio"][1]
    text, vision = feats[:, :dt], feats[:, dt + da:]
    # the shared context spans the top canonical direction between text and vision averages
    from sklearn.cross_decomposition import CCA

    half = len(text) // 2
    cca = CCA(n_components=4).fit(text[:half], vision[:half])
    u, v = cca.transform(text[half:], vision[half:])
    same = np.mean([np.corrcoef(u[:, k], v[:, k])[0, 1] for k in range(4)])
    perm = np.roll(np.arange(len(v)), 1)
    swapped = np.mean([np.corrcoef(u[:, k], v[perm, k])[0, 1] for k in range(4)])
    assert same > 0.5 and abs(swapped) < 0.2, (same, swapped)


def test_nonfinite_only_inside_valid_audio() -> None:
    labeled, unlabeled = make_synthetic("sims2", "small", seed=1, nonfinite_rate=0.05, **SMALL_N)
    for split in (*labeled.values(), *unlabeled.values()):
        audio = split["audio"]
        valid = np.arange(audio.shape[1])[None, :] < np.array(split["audio_lengths"])[:, None]
        bad = ~np.isfinite(audio)
        assert bad.any() and np.all(audio[bad] == -np.inf)
        assert not bad[~valid].any()
        assert 0.02 < bad[valid].mean() < 0.08
        assert np.isfinite(split["vision"]).all() and np.isfinite(split["text"]).all()


def test_write_synthetic_roundtrip(tmp_path) -> None:
    paths = write_synthetic(tmp_path / "out", "mosei", "small", seed=2, **SMALL_N)
    assert [p.name for p in paths] == ["labeled.pkl", "unlabeled.pkl"]
    expected = make_synthetic("mosei", "small", seed=2, **SMALL_N)
    for path, data in zip(paths, expected):
        loaded = safe_load_pickle(path)
        assert set(loaded) == set(data)
        for name in data:
            assert set(loaded[name]) == set(data[name])
            for key, value in data[name].items():
                if isinstance(value, np.ndarray):
                    assert loaded[name][key].dtype == value.dtype
                    assert np.array_equal(loaded[name][key], value)
                else:
                    assert loaded[name][key] == value
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())


@pytest.mark.parametrize("kwargs", [
    {"preset": "mosi"},
    {"scale": "huge"},
    {"n_train": 0},
    {"n_valid": -1},
    {"n_test": 0},
    {"n_unlabeled": 1},
    {"n_train": 2.5},
    {"nonfinite_rate": 1.0},
    {"nonfinite_rate": -0.1},
    {"seed": -1},
])
def test_bad_arguments_raise_data_error(kwargs: dict) -> None:
    with pytest.raises(DataError):
        make_synthetic(**kwargs)


def test_synthetic_counts_fills_defaults_and_names_parameters_as_asked() -> None:
    from aemt.data.synthetic import synthetic_counts  # here: absent before it existed

    assert synthetic_counts("sims2", "small", {"train": 3, "unlabeled": None}, 0) == {**COUNTS[("sims2", "small")],
                                                                                      "train": 3}
    with pytest.raises(DataError, match=r"^N_UNLABELED must be at least 2, got 1$"):
        synthetic_counts("sims2", "small", {"unlabeled": 1}, 0, name=str.upper)
