"""Allocators, criteria, patterns, masks and statistics against small hand-computed cases."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_model
from dlp.allocate import balance, dlp_sparsities, explicit_sparsities, lr_sparsities, owl_sparsities
from dlp.errors import DlpError
from dlp.masks import MaskSet
from dlp.modeling import prunable_linears
from dlp.criteria import Pattern, nm_keep_mask, parse_pattern, rowwise_keep_mask, sparsegpt_prune, wanda_scores
from dlp.stats import collect_input_stats

approx = pytest.approx


# --- allocators --------------------------------------------------------------------------------------------
def test_dlp_hand_case():
    # S = [1,2,3,4]: u = 1 - S/10 = [.9,.8,.7,.6]; scaled to [0, .3] = [.3,.2,.1,0]; keep = scaled - .15 + .3
    assert dlp_sparsities([1, 2, 3, 4], 0.7, 0.15) == approx([0.55, 0.65, 0.75, 0.85])


def test_owl_hand_case_more_outliers_less_pruning():
    # D = [.01,.03,.02] scaled to [0, .16] = [0,.16,.08]; keep = scaled - .08 + .3
    assert owl_sparsities([0.01, 0.03, 0.02], 0.7, 0.08) == approx([0.78, 0.62, 0.70])


def test_lr_hand_case_more_redundant_more_pruning():
    # importance -R = [-.9,-.5,-.7] scaled to [0, .2] = [0,.2,.1]; keep = scaled - .1 + .3
    assert lr_sparsities([0.9, 0.5, 0.7], 0.7, 0.1) == approx([0.8, 0.6, 0.7])


def test_equal_scores_give_uniform():
    assert dlp_sparsities([2, 2, 2], 0.6, 0.15) == approx([0.6] * 3)


def test_balance_weights_by_parameters_and_clips_with_warning():
    assert balance([0.5, 0.7, 0.9], [1, 1, 1], 0.7) == approx([0.5, 0.7, 0.9])
    # sizes 3:1, mean (3·.5 + .9)/4 = .6 -> shift .1 -> [.6, 1.0]; 1.0 is clipped to .99, so
    # 3(.5 + c) + .99 = 2.8 gives c = .10333...
    with pytest.warns(UserWarning, match="clipped"):
        out = balance([0.5, 0.9], [3, 1], 0.7, max_sparsity=0.99)
    assert out == approx([0.5 + 0.31 / 3, 0.99], abs=1e-9)
    assert (3 * out[0] + out[1]) / 4 == approx(0.7, abs=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert balance([0.2, 0.4], [1, 1], 0.3) == approx([0.2, 0.4])


def test_balance_without_rebalance_only_clips():
    with pytest.warns(UserWarning):
        assert balance([-0.1, 0.5], [1, 1], 0.7, rebalance=False) == approx([0.0, 0.5])


def test_explicit_sparsities_forms(tmp_path):
    assert explicit_sparsities("0.5, 0.6,0.7", 3) == approx([0.5, 0.6, 0.7])
    (tmp_path / "a.json").write_text(json.dumps([0.1, 0.2]))
    (tmp_path / "b.json").write_text(json.dumps({"sparsities": [0.3, 0.4]}))
    assert explicit_sparsities(str(tmp_path / "a.json"), 2) == approx([0.1, 0.2])
    assert explicit_sparsities(str(tmp_path / "b.json"), 2) == approx([0.3, 0.4])
    with pytest.raises(DlpError, match="must list 3 values"):
        explicit_sparsities("0.5,0.6", 3)
    with pytest.raises(DlpError, match="comma-separated floats"):
        explicit_sparsities("half", 3)


# --- criteria and patterns ---------------------------------------------------------------------------------
def test_parse_pattern():
    assert parse_pattern("unstructured") == Pattern() and not Pattern().is_nm
    assert parse_pattern("2:4") == Pattern(2, 4) and Pattern(2, 4).sparsity == 0.5
    assert parse_pattern("4:8").sparsity == 0.5
    for bad in ("4:2", "2-4", "a:b", "0:4", "4:4"):
        with pytest.raises(DlpError, match="pattern must be"):
            parse_pattern(bad)


def test_wanda_scores_and_rowwise_mask_hand_case():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    scores = wanda_scores(weight, torch.tensor([4.0, 1.0, 0.25]))  # sqrt -> [2, 1, .5]
    assert torch.equal(scores, torch.tensor([[2.0, 2.0, 1.5], [8.0, 5.0, 3.0]]))
    assert rowwise_keep_mask(scores, 1 / 3).tolist() == [[True, True, False], [True, True, False]]
    assert rowwise_keep_mask(scores, 2 / 3).tolist() == [[False, True, False], [True, False, False]]
    # ties: the lower column index is dropped first
    assert rowwise_keep_mask(torch.tensor([[1.0, 1.0, 2.0]]), 1 / 3).tolist() == [[False, True, True]]


def test_nm_masks_hand_case():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 5.0, 1.0]])
    assert nm_keep_mask(scores, Pattern(2, 4)).tolist() == [[True, False, True, False, False, True, True, False]]
    assert nm_keep_mask(scores, Pattern(4, 8)).tolist() == [[True, False, True, False, False, True, True, False]]
    assert nm_keep_mask(scores, Pattern(1, 4)).tolist() == [[True, False, False, False, False, True, False, False]]
    with pytest.raises(DlpError, match="not a multiple of 4"):
        nm_keep_mask(torch.ones(2, 6), Pattern(2, 4))


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    weight = torch.tensor([[1.0, -5.0, 2.0, 0.5], [3.0, -0.1, 4.0, 6.0]])
    new, keep = sparsegpt_prune(weight, torch.eye(4) * 2.0, 0.5, Pattern(), blocksize=128)
    # the 4 smallest |w| over the block (0.1, 0.5, 1, 2) go; a diagonal H means no compensation
    assert keep.tolist() == [[False, True, False, False], [True, False, True, True]]
    assert torch.equal(new, weight * keep)


def test_sparsegpt_compensates_better_than_magnitude():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen) @ torch.randn(16, 16, generator=gen)  # correlated inputs
    weight = torch.randn(8, 16, generator=gen)
    hessian = 2 * x.T @ x / x.shape[0]
    new, keep = sparsegpt_prune(weight, hessian, 0.5, Pattern(), blocksize=8)
    assert int((~keep).sum()) == 64 and bool((new[~keep] == 0).all())
    magnitude = weight * rowwise_keep_mask(weight.abs(), 0.5)
    assert (x @ (weight - new).T).norm() < 0.8 * (x @ (weight - magnitude).T).norm()
    _, keep24 = sparsegpt_prune(weight, hessian, 0.5, Pattern(2, 4), blocksize=8)
    assert bool((keep24.reshape(8, 4, 4).sum(-1) == 2).all())


# --- masks ---------------------------------------------------------------------------------------------------
def test_mask_file_round_trip_with_odd_shapes(tmp_path):
    gen = torch.Generator().manual_seed(1)
    masks = MaskSet(
        {"a.weight": torch.rand(3, 5, generator=gen) > 0.5, "b": torch.rand(7, 1, generator=gen) > 0.3},
        {"seed": 3, "layer_sparsities": [0.5]},
    )
    loaded = MaskSet.load(masks.save(tmp_path / "m.safetensors"))
    assert loaded.metadata == masks.metadata and loaded.digest() == masks.digest()
    assert all(torch.equal(loaded.masks[k], masks.masks[k]) for k in masks.masks)
    flipped = {k: v.clone() for k, v in masks.masks.items()}
    flipped["b"][0, 0] = ~flipped["b"][0, 0]
    assert MaskSet(flipped).digest() != masks.digest()
    report = MaskSet({"x": torch.tensor([[True, False], [False, False]])}).sparsity_report()
    assert report["overall"] == 0.75 and report["modules"] == {"x": 0.75} and report["weights"] == 4


def test_mask_file_errors(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DlpError, match="not a dlp mask file"):
        MaskSet.load(tmp_path / "other.safetensors")
    with pytest.raises(DlpError, match="file not found"):
        MaskSet.load(tmp_path / "missing.safetensors")


def test_apply_violations_and_model_mismatch():
    model = tiny_model("llama")
    masks = MaskSet({name: torch.rand(lin.weight.shape) > 0.5 for name, lin in prunable_linears(model).items()})
    assert masks.violations(model) > 0
    masks.apply(model)
    assert masks.violations(model) == 0
    with pytest.raises(DlpError, match="the model has no modules"):
        masks.check_matches(tiny_model("llama", layers=2))
    bad = MaskSet({"model.layers.0.mlp.up_proj": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(DlpError, match="has shape"):
        bad.check_matches(model)


# --- statistics ------------------------------------------------------------------------------------------------
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(2, 3)

    def forward(self, x):
        return self.o(self.q(x) + self.k(x))


def test_input_statistics_shared_inputs_hand_case():
    block = _Block()
    x1 = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]])  # 2 tokens
    x2 = torch.tensor([[[3.0, 0.0, 1.0]]])  # 1 token
    with collect_input_stats({"q": block.q, "k": block.k, "o": block.o}, want_xtx=True) as stats:
        block(x1)
        block(x2)
    assert stats["q"].tokens == 3 and stats["o"].tokens == 3
    assert stats["q"].sq_sum.tolist() == [10.0, 5.0, 2.0] == stats["k"].sq_sum.tolist()
    assert stats["q"].sq_mean.tolist() == approx([10 / 3, 5 / 3, 2 / 3])
    flat = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0], [3.0, 0.0, 1.0]])
    assert torch.allclose(stats["q"].xtx, flat.T @ flat) and torch.allclose(stats["q"].hessian, 2 * flat.T @ flat / 3)
    assert len(block.q._forward_pre_hooks) == 0  # hooks removed on exit
