"""dlp/prune.py: patterns, Wanda scores, row-wise and N:M masks, SparseGPT — small hand-computed cases first."""

from __future__ import annotations

import math

import pytest
import torch

from dlp.errors import DlpError
from dlp.criteria import (
    Pattern,
    check_sparsity,
    keep_mask,
    magnitude_scores,
    nm_keep_mask,
    parse_pattern,
    rowwise_keep_mask,
    sparsegpt_prune,
    wanda_scores,
)

T, F = True, False


# --- parse_pattern ---------------------------------------------------------------------------------------------
def test_parse_pattern_valid():
    p = parse_pattern("unstructured")
    assert p == Pattern() and not p.is_nm and p.sparsity is None and str(p) == "unstructured"
    p = parse_pattern("2:4")
    assert p == Pattern(2, 4) and p.is_nm and p.sparsity == 0.5 and str(p) == "2:4"
    p = parse_pattern("4:8")
    assert (p.n, p.m) == (4, 8) and p.sparsity == 0.5 and str(p) == "4:8"
    assert parse_pattern("1:4").sparsity == 0.75


@pytest.mark.parametrize(
    "bad", ["4:2", "2-4", "a:b", "0:4", "4:4", "2:", ":4", "", "2:4:8", "-2:4", "2.0:4", "Unstructured", " 2:4"]
)
def test_parse_pattern_rejects_bad_strings(bad):
    with pytest.raises(DlpError, match="pattern must be"):
        parse_pattern(bad)


def test_check_sparsity():
    check_sparsity(0.0)
    check_sparsity(0.99)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(DlpError, match="must be in"):
            check_sparsity(bad)


# --- scores ------------------------------------------------------------------------------------------------------
def test_wanda_scores_hand_case():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    # sqrt(sq_mean) = [2, 1, 0.5]; |W| * that, column by column
    scores = wanda_scores(weight, torch.tensor([4.0, 1.0, 0.25]))
    assert torch.equal(scores, torch.tensor([[2.0, 2.0, 1.5], [8.0, 5.0, 3.0]]))
    assert scores.dtype == torch.float32


def test_wanda_scores_accept_float64_stats_and_bf16_weights():
    weight = torch.tensor([[1.0, -2.0], [0.5, 4.0]], dtype=torch.bfloat16)
    scores = wanda_scores(weight, torch.tensor([9.0, 16.0], dtype=torch.float64))  # sqrt -> [3, 4]
    assert scores.dtype == torch.float32
    assert scores.tolist() == [[3.0, 8.0], [1.5, 16.0]]


def test_magnitude_scores():
    assert magnitude_scores(torch.tensor([[-1.5, 0.0, 2.0]])).tolist() == [[1.5, 0.0, 2.0]]


# --- rowwise_keep_mask ---------------------------------------------------------------------------------------------
def test_rowwise_keep_mask_hand_case():
    scores = torch.tensor([[2.0, 2.0, 1.5], [8.0, 5.0, 3.0]])
    assert rowwise_keep_mask(scores, 1 / 3).tolist() == [[T, T, F], [T, T, F]]
    # drop 2 per row: row 0 has a tie (2, 2) -> the lower column index (0) is dropped first
    assert rowwise_keep_mask(scores, 2 / 3).tolist() == [[F, T, F], [T, F, F]]
    assert rowwise_keep_mask(scores, 0.0).tolist() == [[T, T, T], [T, T, T]]


def test_rowwise_keep_mask_ties_drop_lower_index_first():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 1.0, 0.5]])
    # row 0: all tied -> columns 0, 1 dropped; row 1: 0.5 (col 3) then the tie at 1.0 -> col 1 before col 2
    assert rowwise_keep_mask(scores, 0.5).tolist() == [[F, F, T, T], [T, F, T, F]]


def test_rowwise_keep_mask_count_is_round_in_times_sparsity():
    # in = 4, sparsity .7 -> round(2 · 4 · 0.7) = round(5.6) = 6 dropped: 3 per row, no remainder
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    assert rowwise_keep_mask(scores, 0.7).tolist() == [[T, F, F, F], [F, F, F, T]]
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(6, 10, generator=gen)
    keep = rowwise_keep_mask(scores, 0.33)  # round(60 · 0.33) = 20 = 6 rows × 3 + 2 more
    assert int((~keep).sum()) == 20 and sorted(keep.sum(1).tolist()) == [6, 6, 7, 7, 7, 7]
    for row, k in zip(scores, keep):  # what is dropped scores no higher than what is kept
        assert row[~k].max() <= row[k].min()


def test_rowwise_keep_mask_gives_the_remainder_to_the_rows_with_the_lowest_next_score():
    """round(3 · 4 · 0.4) = 5 drops: one per row, and two more. The rows' second-lowest scores are 2 (row 0),
    0.5 (row 1) and 3 (row 2, all tied), so rows 1 and 0 drop a second weight; per-row rounding (round(1.6) = 2
    each) would have dropped 6, i.e. 50% instead of the 40% asked."""
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.1, 9.0, 9.0], [3.0, 3.0, 3.0, 3.0]])
    assert rowwise_keep_mask(scores, 0.4).tolist() == [[F, F, T, T], [F, F, T, T], [F, T, T, T]]


# --- nm_keep_mask -------------------------------------------------------------------------------------------------
def test_nm_keep_mask_2_4_hand_case():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 6.0, 1.0], [1.0, 2.0, 3.0, 4.0, 9.0, 8.0, 7.0, 6.0]])
    assert nm_keep_mask(scores, Pattern(2, 4)).tolist() == [[T, F, T, F, F, T, T, F], [F, F, T, T, T, T, F, F]]


def test_nm_keep_mask_4_8_hand_case():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 6.0, 1.5]])
    # the 4 largest of the 8: 6 (col 6), 5 (col 5), 4 (col 0), 3 (col 2) -- here the same as 2:4
    assert nm_keep_mask(scores, Pattern(4, 8)).tolist() == [[T, F, T, F, F, T, T, F]]
    # but not here: 4:8 keeps the whole first half, 2:4 must keep 2 of each half
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 0.0]])
    assert nm_keep_mask(scores, Pattern(4, 8)).tolist() == [[T, T, T, T, F, F, F, F]]
    assert nm_keep_mask(scores, Pattern(2, 4)).tolist() == [[T, T, F, F, F, T, T, F]]


def test_nm_keep_mask_ties_keep_the_lower_index():
    # stable descending sort: among equal scores the earlier column is kept
    assert nm_keep_mask(torch.ones(1, 4), Pattern(2, 4)).tolist() == [[T, T, F, F]]


def test_nm_keep_mask_exact_count_per_group_random():
    gen = torch.Generator().manual_seed(1)
    keep = nm_keep_mask(torch.rand(5, 16, generator=gen), Pattern(2, 4))
    assert keep.reshape(5, 4, 4).sum(-1).eq(2).all()


def test_nm_keep_mask_in_features_not_multiple_of_m():
    with pytest.raises(DlpError, match="not a multiple of 4"):
        nm_keep_mask(torch.ones(2, 6), Pattern(2, 4))
    with pytest.raises(DlpError, match="not a multiple of 8"):
        nm_keep_mask(torch.ones(2, 12), Pattern(4, 8))


def test_keep_mask_dispatches_on_pattern():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    assert keep_mask(scores, 0.75, Pattern()).tolist() == [[T, F, F, F]]
    assert keep_mask(scores, 0.75, Pattern(2, 4)).tolist() == [[T, F, T, F]]  # N:M ignores the sparsity


# --- SparseGPT: hand cases ----------------------------------------------------------------------------------------
def test_sparsegpt_identity_hessian_is_blockwise_magnitude_pruning():
    weight = torch.tensor([[-1.0, 8.0, 3.0, -2.0], [5.0, -6.0, 7.0, 4.0]])
    hessian = torch.eye(4) * 3.0
    # one block covering all columns: the 4 smallest |w| of the whole matrix (1, 2, 3, 4) go, and with a
    # diagonal H the OBS update leaves every kept weight exactly as it was
    new, keep = sparsegpt_prune(weight, hessian, 0.5, Pattern(), blocksize=128)
    assert keep.tolist() == [[F, T, F, F], [T, T, T, F]]
    assert new.tolist() == [[0.0, 8.0, 0.0, 0.0], [5.0, -6.0, 7.0, 0.0]]
    # blocks of 2 columns: block [[-1, 8], [5, -6]] drops 1 and 5; block [[3, -2], [7, 4]] drops 2 and 3
    new, keep = sparsegpt_prune(weight, hessian, 0.5, Pattern(), blocksize=2)
    assert keep.tolist() == [[F, T, F, F], [F, T, T, T]]
    assert new.tolist() == [[0.0, 8.0, 0.0, 0.0], [0.0, -6.0, 7.0, 4.0]]


def test_sparsegpt_obs_update_hand_case():
    # H = [[2, 1], [1, 2]], no damping. H⁻¹ = 1/3·[[2, -1], [-1, 2]]; its upper Cholesky factor is
    # U = [[√(2/3), -1/√6], [0, 1/√2]], so the saliencies w²/U_jj² are w0²·3/2 and w1²·2:
    #   row 0 (1, 2): [1.5, 8]   row 1 (3, 1): [13.5, 2]   -> the two lowest: (0, 0) and (1, 1).
    # Pruning w00 = 1: err = 1/√(2/3); w01 -= err·U01 = 2 + (1/√(2/3))(1/√6) = 2.5
    # (the least-squares optimum: minimise δᵀHδ with δ0 = 1 -> δ1 = -1/2). Pruning w11, the last column, has
    # nothing after it to compensate, so w10 stays 3.
    weight = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    hessian = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    new, keep = sparsegpt_prune(weight, hessian, 0.5, Pattern(), percdamp=0.0)
    assert keep.tolist() == [[F, T], [T, F]]
    assert torch.allclose(new, torch.tensor([[0.0, 2.5], [3.0, 0.0]]), atol=1e-6)
    # lazy batch updates across blocks give the same result: block 0 = column 0 drops (0, 0) (1.5 < 13.5),
    # the update w01 = 2.5 crosses into block 1, where 2.5²·2 = 12.5 > 1²·2 = 2 drops (1, 1)
    new1, keep1 = sparsegpt_prune(weight, hessian, 0.5, Pattern(), blocksize=1, percdamp=0.0)
    assert keep1.tolist() == [[F, T], [T, F]]
    assert torch.allclose(new1, torch.tensor([[0.0, 2.5], [3.0, 0.0]]), atol=1e-6)


def test_sparsegpt_damping_hand_case():
    # percdamp .5, mean diag(H) = 2 -> H + 1·I = [[3, 1], [1, 3]]; the optimum for δ0 = 1 is δ1 = -1/3
    weight = torch.tensor([[1.0, 2.0], [3.0, 1.0]])
    hessian = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    new, keep = sparsegpt_prune(weight, hessian, 0.5, Pattern(), percdamp=0.5)
    assert keep.tolist() == [[F, T], [T, F]]
    assert torch.allclose(new, torch.tensor([[0.0, 7 / 3], [3.0, 0.0]]), atol=1e-6)


def test_sparsegpt_dead_inputs_are_zeroed_and_pruned_first():
    # column 1 never sees input (H11 = 0): its weights are zeroed; their saliency 0 makes them the first pruned.
    # The other columns have equal diagonal, so the remaining 2 of 4 go by |w|: 0.5 (1, 2) and 1 (0, 0).
    weight = torch.tensor([[1.0, 5.0, 2.0, 4.0], [3.0, 6.0, 0.5, 7.0]])
    hessian = torch.diag(torch.tensor([2.0, 0.0, 2.0, 2.0]))
    new, keep = sparsegpt_prune(weight, hessian, 0.5, Pattern())
    assert keep.tolist() == [[F, F, T, T], [T, F, F, T]]
    assert new.tolist() == [[0.0, 0.0, 2.0, 4.0], [3.0, 0.0, 0.0, 7.0]]


def test_sparsegpt_nm_mask_uses_updated_weights_hand_case():
    # SparseGPT's N:M variant (paper, sec. 4 / reference code) picks the mask of every group of M columns from
    # the weights *after* the updates of the earlier columns, so blocksize only changes speed.
    # H couples columns 0 and 2 only: H = [[2,0,1,0],[0,2,0,0],[1,0,2,0],[0,0,0,2]], no damping; U (upper
    # Cholesky of H⁻¹) has U00 = √(2/3), U02 = -1/√6, U11 = U22 = U33 = 1/√2. W = [1, 1.1, 2, 2.2], pattern 1:2.
    # Group (0, 1): saliencies 1·3/2 = 1.5 < 1.21·2 = 2.42 -> drop w0; the update makes w2 = 2 + 1/2 = 2.5.
    # Group (2, 3): 2.5²·2 = 12.5 > 2.2²·2 = 9.68 -> drop w3.  Result [0, 1.1, 2.5, 0] (δᵀHδ = 11.18, whereas
    # dropping w2 instead gives [0, 1.1, 0, 2.2] with δᵀHδ = 14).
    weight = torch.tensor([[1.0, 1.1, 2.0, 2.2]])
    hessian = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    for blocksize in (2, 4, 128):
        new, keep = sparsegpt_prune(weight, hessian, 0.5, Pattern(1, 2), blocksize=blocksize, percdamp=0.0)
        assert keep.tolist() == [[F, T, T, F]], f"blocksize={blocksize}"
        assert torch.allclose(new, torch.tensor([[0.0, 1.1, 2.5, 0.0]]), atol=1e-6), f"blocksize={blocksize}"


# --- SparseGPT: random data ------------------------------------------------------------------------------------------
def _random_problem(seed: int = 0, rows: int = 8, cols: int = 16, tokens: int = 256):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen) @ torch.randn(cols, cols, generator=gen)  # correlated inputs
    weight = torch.randn(rows, cols, generator=gen)
    return x, weight, 2.0 / tokens * x.T @ x


@pytest.mark.parametrize("blocksize", [16, 8])
def test_sparsegpt_random_exact_sparsity_and_better_reconstruction(blocksize):
    x, weight, hessian = _random_problem()
    new, keep = sparsegpt_prune(weight, hessian, 0.5, Pattern(), blocksize=blocksize)
    assert keep.shape == weight.shape and keep.dtype == torch.bool and new.dtype == weight.dtype
    assert int((~keep).sum()) == 64  # 8·16·0.5
    for i1 in range(0, 16, blocksize):  # every block hits the sparsity exactly too
        assert int((~keep[:, i1 : i1 + blocksize]).sum()) == 8 * blocksize // 2
    assert bool((new[~keep] == 0).all())
    assert bool((new[keep] != 0).all())
    error = (x @ (weight - new).T).norm()
    magnitude = weight * rowwise_keep_mask(weight.abs(), 0.5)  # plain magnitude pruning, same sparsity
    assert error < (x @ (weight - magnitude).T).norm()


def test_sparsegpt_beats_magnitude_by_far_when_input_scales_differ():
    # As in LLMs, some input features are much larger than others (here x100 from first to last column):
    # SparseGPT keeps the weights that matter for the output, magnitude pruning does not.
    x, weight, _ = _random_problem(seed=2)
    x = x * torch.logspace(-1, 1, 16)
    hessian = 2.0 / x.shape[0] * x.T @ x
    new, keep = sparsegpt_prune(weight, hessian, 0.5, Pattern(), blocksize=16)
    assert int((~keep).sum()) == 64 and bool((new[~keep] == 0).all())
    magnitude = weight * rowwise_keep_mask(weight.abs(), 0.5)
    assert (x @ (weight - new).T).norm() < 0.5 * (x @ (weight - magnitude).T).norm()


def test_sparsegpt_random_other_sparsity_and_dtype():
    x, weight, hessian = _random_problem(seed=3, rows=6, cols=16)
    new, keep = sparsegpt_prune(weight.to(torch.bfloat16), hessian, 0.75, Pattern(), blocksize=16)
    assert new.dtype == torch.bfloat16
    assert int((~keep).sum()) == 72 and bool((new[~keep] == 0).all())
    assert weight.dtype == torch.float32  # the input is not modified
    before = weight.clone()
    sparsegpt_prune(weight, hessian, 0.5, Pattern())
    assert torch.equal(weight, before)


@pytest.mark.parametrize("pattern,group", [(Pattern(2, 4), 4), (Pattern(4, 8), 8)])
def test_sparsegpt_nm_exact_count_per_group(pattern, group):
    x, weight, hessian = _random_problem(seed=1)
    new, keep = sparsegpt_prune(weight, hessian, 0.0, pattern, blocksize=16)
    assert keep.reshape(8, 16 // group, group).sum(-1).eq(pattern.n).all()
    nonzero = (new != 0).reshape(8, 16 // group, group).sum(-1)
    assert nonzero.eq(pattern.n).all()  # exactly N nonzeros in every group of M
    assert torch.equal(new != 0, keep)


def test_sparsegpt_nm_does_not_depend_on_blocksize():
    # With the mask of each M-group chosen from the updated weights, lazy batching is exact: any blocksize that is a
    # multiple of M gives the same masks and (up to rounding) the same weights.
    x, weight, hessian = _random_problem(seed=0)
    ref, ref_keep = sparsegpt_prune(weight, hessian, 0.5, Pattern(2, 4), blocksize=4)
    new, keep = sparsegpt_prune(weight, hessian, 0.5, Pattern(2, 4), blocksize=16)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(new, ref, atol=1e-4)
    assert math.isfinite(float((x @ (weight - new).T).norm()))
