"""dlp/allocate.py against small cases worked out by hand (the expected numbers are written literally)."""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager

import pytest
import torch

from dlp.allocate import (
    balance,
    centred,
    dlp_sparsities,
    explicit_sparsities,
    lr_sparsities,
    minmax_spread,
    owl_sparsities,
)
from dlp.errors import DlpError

approx = pytest.approx


@contextmanager
def no_warnings():
    """Any warning inside is an error (so an unexpected clip makes the test fail)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --- minmax_spread / centred ---------------------------------------------------------------------------------
def test_minmax_spread_hand_case():
    # [3, 1, 2]: low 1, high 3 -> (v - 1)/2 * (2 * 0.5) = [1, 0, 0.5]
    out = minmax_spread(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64), 0.5)
    assert out.tolist() == approx([1.0, 0.0, 0.5])
    # negative values are fine: [-4, 0, -2] -> (v + 4)/4 * 0.2 = [0, 0.2, 0.1]
    out = minmax_spread(torch.tensor([-4.0, 0.0, -2.0], dtype=torch.float64), 0.1)
    assert out.tolist() == approx([0.0, 0.2, 0.1])


def test_minmax_spread_all_equal_gives_zeros():
    out = minmax_spread(torch.tensor([0.7, 0.7, 0.7], dtype=torch.float64), 0.3)
    assert out.tolist() == [0.0, 0.0, 0.0]


def test_centred_hand_case():
    # importance [1, 3] -> scaled [0, 0.2], mean 0.1 -> keep = scaled - 0.1 + 0.5 = [0.4, 0.6] -> sparsity [0.6, 0.4]
    assert centred([1.0, 3.0], 0.5, 0.1) == approx([0.6, 0.4])
    # a single layer has no spread: it gets the target
    assert centred([42.0], 0.35, 0.2) == approx([0.35])


# --- dlp -----------------------------------------------------------------------------------------------------
def test_dlp_hand_case_from_the_brief():
    # S = [1,2,3,4], ΣS = 10: u = 1 - S/10 = [.9,.8,.7,.6]
    # min-max scaled to [0, 2*.15 = .3]: (u - .6)/.3 * .3 = [.3,.2,.1,0]; mean .15
    # keep = scaled - .15 + (1 - .7) = [.45,.35,.25,.15]  ->  sparsity = [.55,.65,.75,.85]
    out = dlp_sparsities([1, 2, 3, 4], 0.7, 0.15)
    assert out == approx([0.55, 0.65, 0.75, 0.85])
    assert sum(out) / 4 == approx(0.7)
    assert all(a < b for a, b in zip(out, out[1:]))  # a larger score is pruned more
    assert max(out) - min(out) == approx(2 * 0.15)  # the spread is at most 2·alpha


def test_dlp_second_hand_case_non_uniform():
    # S = [2, 6, 2], ΣS = 10: u = [.8,.4,.8]; scaled to [0, .2]: [.2, 0, .2], mean .4/3
    # keep = scaled - .4/3 + .5 = [17/30, 11/30, 17/30]  ->  sparsity [13/30, 19/30, 13/30]
    out = dlp_sparsities([2.0, 6.0, 2.0], 0.5, 0.1)
    assert out == approx([13 / 30, 19 / 30, 13 / 30])
    assert sum(out) / 3 == approx(0.5)


def test_dlp_uses_absolute_scores():
    assert dlp_sparsities([-1, 2, -3, 4], 0.7, 0.15) == approx([0.55, 0.65, 0.75, 0.85])


def test_dlp_equal_scores_give_uniform():
    assert dlp_sparsities([5.0, 5.0, 5.0], 0.6, 0.2) == approx([0.6, 0.6, 0.6])


def test_dlp_all_zero_scores_is_a_user_error():
    with pytest.raises(DlpError, match="every layer score is zero"):
        dlp_sparsities([0.0, 0.0], 0.5, 0.1)


# --- owl / lr --------------------------------------------------------------------------------------------------
def test_owl_hand_case_more_outliers_less_sparsity():
    # D = [.05,.10,.15] scaled to [0, .2]: [0, .1, .2], mean .1 -> keep = [.4,.5,.6] -> sparsity [.6,.5,.4]
    out = owl_sparsities([0.05, 0.10, 0.15], 0.5, 0.1)
    assert out == approx([0.6, 0.5, 0.4])
    assert sum(out) / 3 == approx(0.5)
    # the layer with the most outliers is pruned least, whatever its position
    out = owl_sparsities([0.30, 0.01, 0.02], 0.6, 0.05)
    assert out.index(min(out)) == 0 and out.index(max(out)) == 1


def test_lr_hand_case_more_redundant_more_sparsity():
    # importance -R = [-.2,-.8,-.5]; min -.8, range .6; scaled to [0, .1]: [.1, 0, .05], mean .05
    # keep = scaled - .05 + .4 = [.45,.35,.40] -> sparsity [.55,.65,.60]
    out = lr_sparsities([0.2, 0.8, 0.5], 0.6, 0.05)
    assert out == approx([0.55, 0.65, 0.60])
    assert sum(out) / 3 == approx(0.6)


# --- explicit ---------------------------------------------------------------------------------------------------
def test_explicit_from_list_tuple_and_string():
    assert explicit_sparsities([0.1, 0.2, 0.3], 3) == approx([0.1, 0.2, 0.3])
    assert explicit_sparsities((0.5, 0.25), 2) == approx([0.5, 0.25])
    assert explicit_sparsities("0.5, 0.6,0.7", 3) == approx([0.5, 0.6, 0.7])
    assert explicit_sparsities("0.5,0.6,", 2) == approx([0.5, 0.6])  # empty items are ignored
    out = explicit_sparsities([0, 0], 2)
    assert out == [0.0, 0.0] and all(type(v) is float for v in out)


@pytest.mark.parametrize(
    "values, bad", [("1.5,0.2", "1.5"), ([0.5, -0.1], "-0.1"), ([1, 0], "1"), ("0.995,0.5", "0.995")]
)
def test_explicit_values_outside_0_and_max_layer_sparsity_are_refused(values, bad):
    """The regression: 1.5,0.2 used to be clipped to 0.99,0.2 while a warning claimed the mean stayed on target."""
    with pytest.raises(DlpError, match=rf"must be in \[0, max_layer_sparsity=0.99\] \(got {bad}\)"):
        explicit_sparsities(values, 2)


def test_explicit_from_json_files(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([0.1, 0.2]))
    (tmp_path / "dict.json").write_text(json.dumps({"sparsities": [0.3, 0.4, 0.5]}))
    (tmp_path / "alt.json").write_text(json.dumps({"layer_sparsity": [0.6]}))
    assert explicit_sparsities(str(tmp_path / "list.json"), 2) == approx([0.1, 0.2])
    assert explicit_sparsities(str(tmp_path / "dict.json"), 3) == approx([0.3, 0.4, 0.5])
    assert explicit_sparsities(str(tmp_path / "alt.json"), 1) == approx([0.6])


def test_explicit_wrong_length_is_a_user_error(tmp_path):
    with pytest.raises(DlpError, match="must list 3 values"):
        explicit_sparsities([0.5, 0.5], 3)
    with pytest.raises(DlpError, match=r"must list 3 values.*got 4"):  # too many is not silently truncated
        explicit_sparsities([0.5, 0.5, 0.5, 0.5], 3)
    with pytest.raises(DlpError, match="must list 3 values"):
        explicit_sparsities("0.1,0.2,0.3,0.4", 3)
    with pytest.raises(DlpError, match="must list 3 values"):
        explicit_sparsities("0.5,0.6", 3)
    (tmp_path / "list.json").write_text(json.dumps([0.1, 0.2]))
    with pytest.raises(DlpError, match="must list 3 values"):
        explicit_sparsities(str(tmp_path / "list.json"), 3)
    (tmp_path / "dict.json").write_text(json.dumps({"sparsities": [0.1, 0.2, 0.3, 0.4]}))
    with pytest.raises(DlpError, match="must list 3 values"):
        explicit_sparsities(str(tmp_path / "dict.json"), 3)
    (tmp_path / "nokey.json").write_text(json.dumps({"other": [0.1, 0.2, 0.3]}))
    with pytest.raises(DlpError, match="must be a non-empty list of numbers"):
        explicit_sparsities(str(tmp_path / "nokey.json"), 3)


def test_explicit_not_numbers_is_a_user_error():
    with pytest.raises(DlpError, match="comma-separated floats"):
        explicit_sparsities("half", 3)
    with pytest.raises(DlpError, match="comma-separated floats"):
        explicit_sparsities("0.5,x,0.7", 3)
    with pytest.raises(DlpError):  # a JSON file that does not exist is read as (bad) floats
        explicit_sparsities("does-not-exist.json", 3)


def test_explicit_json_file_holding_a_scalar_is_a_user_error(tmp_path):
    # A JSON file holding neither a list nor a dict (e.g. just `0.5`) must give the one-line DlpError, not crash
    # while building the error message.
    (tmp_path / "scalar.json").write_text("0.5")
    with pytest.raises(DlpError, match="must be a non-empty list of numbers"):
        explicit_sparsities(str(tmp_path / "scalar.json"), 2)


# --- balance ----------------------------------------------------------------------------------------------------
def test_balance_equal_sizes_leaves_centred_values_unchanged():
    with no_warnings():
        assert balance([0.55, 0.65, 0.75, 0.85], [10, 10, 10, 10], 0.7) == approx([0.55, 0.65, 0.75, 0.85], abs=1e-12)
        assert balance([0.2, 0.4], [1, 1], 0.3) == approx([0.2, 0.4], abs=1e-12)


def test_balance_unequal_sizes_hand_case():
    # sizes 1:3, weighted mean (0.6 + 3·0.8)/4 = 0.75 -> shift -0.05 -> [0.55, 0.75]; (0.55 + 3·0.75)/4 = 0.7
    with no_warnings():
        out = balance([0.6, 0.8], [1, 3], 0.7)
    assert out == approx([0.55, 0.75], abs=1e-9)
    assert (out[0] * 1 + out[1] * 3) / 4 == approx(0.7, abs=1e-9)


def test_balance_clips_high_with_warning_and_keeps_weighted_mean():
    # equal sizes, target .95, max .99: shift c with (0.1 + c) + min(0.9 + c, .99) = 1.9 -> c = .81 -> [.91, .99]
    with pytest.warns(UserWarning, match="clipped"):
        out = balance([0.1, 0.9], [1, 1], 0.95, max_sparsity=0.99)
    assert out == approx([0.91, 0.99], abs=1e-9)
    assert sum(out) / 2 == approx(0.95, abs=1e-9)


def test_balance_clips_low_with_warning_and_keeps_weighted_mean():
    # mean .4, target .2: shift c < 0 with max(0, c) + 0.8 + c = 0.4 -> c = -.4 -> [0, .4]
    with pytest.warns(UserWarning, match=r"layers \[0\]"):
        out = balance([0.0, 0.8], [1, 1], 0.2)
    assert out == approx([0.0, 0.4], abs=1e-9)
    assert out[0] >= 0.0
    assert sum(out) / 2 == approx(0.2, abs=1e-9)


def test_balance_unequal_sizes_with_clipping_hand_case():
    # sizes 1:4, max .95, target .9: weighted mean (0.2 + 4·0.9)/5 = .76.
    # with the second clipped: (0.2 + c + 4·0.95)/5 = 0.9 -> c = 0.5 -> [0.7, 0.95] (0.9 + 0.5 > 0.95: clipped)
    with pytest.warns(UserWarning, match=r"layers \[1\]"):
        out = balance([0.2, 0.9], [1, 4], 0.9, max_sparsity=0.95)
    assert out == approx([0.7, 0.95], abs=1e-9)
    assert (out[0] + 4 * out[1]) / 5 == approx(0.9, abs=1e-9)


def test_balance_without_rebalance_only_clips():
    with pytest.warns(UserWarning, match="clipped"):
        out = balance([-0.1, 0.5, 1.2], [1, 1, 1], 0.7, max_sparsity=0.99, rebalance=False)
    assert out == approx([0.0, 0.5, 0.99])
    with no_warnings():  # in range: returned as given, whatever the target and the sizes
        assert balance([0.3, 0.9], [5, 1], 0.1, rebalance=False) == approx([0.3, 0.9], abs=1e-12)


def test_balance_target_out_of_range_is_a_user_error():
    with pytest.raises(DlpError, match="sparsity must be in"):
        balance([0.5, 0.5], [1, 1], 0.995, max_sparsity=0.99)
    with pytest.raises(DlpError, match="sparsity must be in"):
        balance([0.5, 0.5], [1, 1], -0.1)
