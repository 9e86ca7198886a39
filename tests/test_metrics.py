"""MMSA metrics on small hand-checked cases, including the bin boundaries."""

from __future__ import annotations

import numpy as np
import pytest

from aemt.evaluation.metrics import compute_metrics, sims_bins


def test_sims_bin_boundaries():
    # (lo, hi] intervals: 0 is negative; ±0.1 and ±0.7 belong to the lower bin
    values = np.array([-1.0, -0.7, -0.69, -0.1, -0.09, 0.0, 0.1, 0.11, 0.7, 0.71, 1.0])
    assert sims_bins(values, 2).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert sims_bins(values, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert sims_bins(values, 5).tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]


def test_sims_hand_checked():
    pred = np.array([0.05, -0.2, 0.8, 1.5])  # 1.5 clipped to 1
    true = np.array([0.0, -0.6, 0.6, 1.0])
    out = compute_metrics(pred, true, "sims")
    # 2-class: pred [1,0,1,1], true [0,0,1,1] -> 3/4
    assert out["Mult_acc_2"] == 0.75
    # 3-class: pred [1,0,2,2], true [1,0,2,2] -> 1
    assert out["Mult_acc_3"] == 1.0
    # 5-class: pred [2,1,4,4], true [2,1,3,4] -> 3/4
    assert out["Mult_acc_5"] == 0.75
    assert out["MAE"] == round((0.05 + 0.4 + 0.2 + 0.0) / 4, 4)
    assert out["Corr"] == round(float(np.corrcoef([0.05, -0.2, 0.8, 1.0], true)[0, 1]), 4)
    # weighted F1 over true classes {0: 2 clips, 1: 2 clips}: class 0 p=1 r=.5 f=2/3; class 1 p=2/3 r=1 f=.8
    assert out["F1_score"] == round(0.5 * (2 / 3) + 0.5 * 0.8, 4)
    assert list(out) == ["Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr"]


def test_mosei_hand_checked():
    pred = np.array([0.4, -0.2, 2.6, -3.4, 0.0])
    true = np.array([0.0, -1.0, 3.0, -2.0, 1.2])
    out = compute_metrics(pred, true, "mosei")
    # Has0: pred>=0 [1,0,1,0,1], true>=0 [1,0,1,0,1] -> 1
    assert out["Has0_acc_2"] == 1.0 and out["Has0_F1_score"] == 1.0
    # Non0 drops label 0 (first clip): pred>0 [0,1,0,0], true>0 [0,1,0,1] -> 3/4
    assert out["Non0_acc_2"] == 0.75
    # acc7: round(clip(pred,-3,3)) [0,-0,3,-3,0] vs [0,-1,3,-2,1] -> 2/5
    assert out["Mult_acc_7"] == 0.4
    # acc5: clip to [-2,2]: pred [0,-0,2,-2,0], true [0,-1,2,-2,1] -> 3/5
    assert out["Mult_acc_5"] == 0.6
    assert out["MAE"] == round(np.mean(np.abs(pred - true)), 4)  # unclipped
    assert out["Corr"] == round(float(np.corrcoef(pred, true)[0, 1]), 4)


def test_rounding_to_four_decimals():
    out = compute_metrics(np.array([0.123456, -0.5, 0.3]), np.array([0.1, -0.4, 0.9]), "sims")
    assert all(round(v, 4) == v for v in out.values())


def test_bad_inputs():
    with pytest.raises(ValueError, match="equal length"):
        compute_metrics([1.0], [1.0, 2.0], "sims")
    with pytest.raises(ValueError, match="'sims' or 'mosei'"):
        compute_metrics([1.0, 0.0], [1.0, 0.0], "mosi")


def test_sims_bins_compare_in_float32_as_mmsa():
    """MMSA bins its float32 labels and outputs against Python-float edges, which numpy compares in
    float32: float32(0.1) and float32(-0.7) sit on their edges (lower bin). In float64 they would not."""
    true = np.array([0.1, -0.1, 0.7, -0.7, 0.5], np.float32)
    pred = np.array([0.05, -0.05, 0.65, -0.65, 0.5], np.float32)
    # 3 classes, true: 1, 0, 2, 0, 2; pred: 1, 1, 2, 0, 2
    assert compute_metrics(pred, true, "sims")["Mult_acc_3"] == 0.8
    assert compute_metrics(pred.astype(np.float64), true.astype(np.float64), "sims")["Mult_acc_3"] == 0.8


def test_values_beyond_float32_are_refused_not_made_inf():
    from aemt.errors import DataError

    with pytest.raises(DataError, match=r"key 'prediction': expected values within float32's range .*got 1e\+39"):
        compute_metrics(np.array([1e39, 0.5, 0.2]), np.array([0.1, 0.2, -0.3]), "mosei")
