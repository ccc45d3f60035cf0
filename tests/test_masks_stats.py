"""dlp/masks.py (mask files), dlp/stats.py (input statistics) and dlp/data.py (sources and windows), by hand."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dlp.data import consecutive_windows, read_text, sample_windows
from dlp.errors import DlpError
from dlp.masks import FORMAT, MaskSet
from dlp.modeling import prunable_linears
from dlp.stats import _SharedReducer, collect_input_stats, stats_hook, InputStats

T, F = True, False


def tiny_llama(seed: int = 0, layers: int = 2, intermediate_size: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(config).eval()


LLAMA_SHAPES = {
    "self_attn.q_proj": (16, 16),
    "self_attn.k_proj": (8, 16),
    "self_attn.v_proj": (8, 16),
    "self_attn.o_proj": (16, 16),
    "mlp.gate_proj": (32, 16),
    "mlp.up_proj": (32, 16),
    "mlp.down_proj": (16, 32),
}


# --- MaskSet: files ------------------------------------------------------------------------------------------------
def _odd_masks() -> MaskSet:
    gen = torch.Generator().manual_seed(1)
    return MaskSet(
        {
            "a.weight": torch.rand(3, 5, generator=gen) > 0.5,  # 15 bits: 1 padding bit
            "b": torch.rand(7, 1, generator=gen) > 0.3,  # 7 bits: 1 byte, 1 padding bit
            "c": torch.rand(8, 8, generator=gen) > 0.5,  # 64 bits: no padding
            "d": torch.tensor([[True]]),
            "e": torch.rand(7, 9, generator=gen) > 0.7,
        },  # 63 bits
        {"seed": 3, "layer_sparsities": [0.5, 0.25], "model": "tiny", "nested": {"k": [1, 2]}},
    )


def test_save_load_round_trip_is_bit_exact(tmp_path):
    masks = _odd_masks()
    path = masks.save(tmp_path / "sub" / "m.safetensors")  # the parent folder is created
    assert path == tmp_path / "sub" / "m.safetensors" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.safetensors"]  # no temp file left behind
    loaded = MaskSet.load(path)
    assert loaded.metadata == masks.metadata
    assert set(loaded.masks) == set(masks.masks)
    for name, mask in masks.masks.items():
        assert loaded.masks[name].dtype == torch.bool
        assert loaded.masks[name].shape == mask.shape
        assert torch.equal(loaded.masks[name], mask), name
    assert loaded.digest() == masks.digest()


def test_saved_file_is_bit_packed_hand_case(tmp_path):
    # 3x5 row-major bits 10110 00011 11111 -> packed big-endian: 10110000 = 176, 1111111(0) = 254 (padding bit 0)
    mask = torch.tensor([[T, F, T, T, F], [F, F, F, T, T], [T, T, T, T, T]])
    path = MaskSet({"m": mask}).save(tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("m").tolist() == [176, 254]
    assert meta["format"] == FORMAT == "dlp-masks/1"
    assert json.loads(meta["shapes"]) == {"m": [3, 5]}
    assert torch.equal(MaskSet.load(path).masks["m"], mask)


def test_round_trip_of_non_contiguous_and_integer_masks(tmp_path):
    base = torch.tensor([[T, F, T], [F, F, T], [T, T, F], [F, T, T], [T, F, F]])  # 5x3
    transposed = base.T  # 3x5, not contiguous
    as_int = base.to(torch.uint8)
    loaded = MaskSet.load(MaskSet({"t": transposed, "i": as_int}).save(tmp_path / "m.safetensors"))
    assert loaded.masks["t"].tolist() == [[T, F, T, F, T], [F, F, T, T, F], [T, T, F, T, F]]
    assert torch.equal(loaded.masks["i"], base)


def test_digest_equal_for_equal_masks_and_changes_with_one_bit():
    masks = _odd_masks()
    same = MaskSet({k: v.clone() for k, v in reversed(list(masks.masks.items()))}, {"other": "metadata"})
    assert same.digest() == masks.digest()  # names sorted, metadata not part of it
    assert len(masks.digest()) == 64 and int(masks.digest(), 16) >= 0
    for name in masks.masks:
        for index in (0, masks.masks[name].numel() - 1):  # first and last bit (the last sits next to padding)
            flipped = {k: v.clone() for k, v in masks.masks.items()}
            flat = flipped[name].view(-1)
            flat[index] = ~flat[index]
            assert MaskSet(flipped).digest() != masks.digest(), (name, index)


def test_digest_covers_names_and_shapes():
    bits = torch.tensor([T, F, T, T, F, F, F, T, T, T, T, T, T, F, F])
    a = MaskSet({"m": bits.view(3, 5)})
    assert MaskSet({"m": bits.view(5, 3)}).digest() != a.digest()
    assert MaskSet({"n": bits.view(3, 5)}).digest() != a.digest()
    assert MaskSet({"m": bits.view(3, 5).clone()}).digest() == a.digest()


def test_load_missing_file(tmp_path):
    with pytest.raises(DlpError, match="file not found"):
        MaskSet.load(tmp_path / "missing.safetensors")


def test_load_safetensors_that_is_not_a_mask_file(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(DlpError, match="not a dlp mask file"):
        MaskSet.load(tmp_path / "weights.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DlpError, match="not a dlp mask file"):
        MaskSet.load(tmp_path / "other.safetensors")


def test_load_file_that_is_not_safetensors_at_all(tmp_path):
    # e.g. a text file, or a half-copied download: the user must get a DlpError, not a safetensors traceback
    (tmp_path / "notes.safetensors").write_text("these are not masks\n")
    with pytest.raises(DlpError):
        MaskSet.load(tmp_path / "notes.safetensors")


def test_load_detects_corrupted_bits(tmp_path):
    path = _odd_masks().save(tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    tensors["c"][0] ^= 1  # one bit of an 8x8 mask
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(DlpError, match="corrupt"):
        MaskSet.load(path)


def test_sparsity_report_hand_case():
    masks = MaskSet(
        {
            "a": torch.tensor([[T, F, F, F, F], [F, T, F, F, F], [T, F, F, F, T]]),  # 4 of 15 kept
            "b": torch.tensor([[T, F], [F, T]]),
        }
    )  # 2 of 4 kept
    report = masks.sparsity_report()
    assert report["weights"] == 19
    assert report["overall"] == pytest.approx(13 / 19)  # 1 - 6/19
    assert report["modules"] == pytest.approx({"a": 11 / 15, "b": 0.5})


# --- MaskSet: models ------------------------------------------------------------------------------------------------
def _llama_masks(model: nn.Module, seed: int = 0) -> MaskSet:
    gen = torch.Generator().manual_seed(seed)
    return MaskSet(
        {name: torch.rand(lin.weight.shape, generator=gen) > 0.5 for name, lin in prunable_linears(model).items()},
        {"model": "tiny-llama"},
    )


def test_tiny_llama_prunable_linears_are_the_expected_ones():
    model = tiny_llama()
    expected = {f"model.layers.{i}.{name}": shape for i in range(2) for name, shape in LLAMA_SHAPES.items()}
    assert {n: tuple(lin.weight.shape) for n, lin in prunable_linears(model).items()} == expected


def test_apply_zeroes_masked_weights_and_violations_count_them():
    model = tiny_llama()
    linears = prunable_linears(model)
    q = linears["model.layers.0.self_attn.q_proj"]
    masks = MaskSet({name: torch.ones(lin.weight.shape, dtype=torch.bool) for name, lin in linears.items()})
    masks.masks["model.layers.0.self_attn.q_proj"][0, :3] = False  # 3 masked weights
    with torch.no_grad():
        q.weight.fill_(2.0)
        assert masks.violations(model) == 3
        q.weight[0, 1] = 0.0  # a masked weight that is already zero is no violation
        assert masks.violations(model) == 2
    before = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    masks.apply(model)
    assert masks.violations(model) == 0
    assert q.weight[0, :3].tolist() == [0.0, 0.0, 0.0]
    assert float(q.weight.detach().sum()) == 2.0 * (256 - 3)
    for name, lin in linears.items():  # nothing else changed
        if name != "model.layers.0.self_attn.q_proj":
            assert torch.equal(lin.weight, before[name]), name


def test_apply_random_masks_on_tiny_llama():
    model = tiny_llama()
    masks = _llama_masks(model)
    expected = sum(int((lin.weight[~masks.masks[n]] != 0).sum()) for n, lin in prunable_linears(model).items())
    assert masks.violations(model) == expected > 0
    masks.apply(model)
    assert masks.violations(model) == 0
    for name, lin in prunable_linears(model).items():
        assert bool((lin.weight[~masks.masks[name]] == 0).all())
        assert bool((lin.weight[masks.masks[name]] != 0).all())  # random init: kept weights are not zero


def test_check_matches_returns_the_models_linears():
    model = tiny_llama()
    masks = _llama_masks(model)
    matched = masks.check_matches(model)
    linears = prunable_linears(model)
    assert set(matched) == set(masks.masks)
    assert all(matched[name] is linears[name] for name in matched)
    subset = MaskSet({"model.layers.1.mlp.down_proj": torch.ones(16, 32, dtype=torch.bool)})
    with pytest.raises(DlpError, match=r"they cover 1 of the model's \d+ prunable modules"):
        subset.check_matches(model)  # modules without a mask would stay dense while the report says sparse
    subset.force = True
    with pytest.warns(UserWarning, match="applying them anyway because of --force"):
        assert list(subset.check_matches(model)) == ["model.layers.1.mlp.down_proj"]


def test_check_matches_other_names_is_a_user_error():
    masks = _llama_masks(tiny_llama(layers=3))
    with pytest.raises(DlpError, match=r"no modules \['model.layers.2"):
        masks.check_matches(tiny_llama(layers=2))
    with pytest.raises(DlpError, match="tiny-llama"):
        masks.apply(tiny_llama(layers=2))
    renamed = MaskSet({"decoder.layers.0.q": torch.ones(16, 16, dtype=torch.bool)})
    with pytest.raises(DlpError, match="no modules"):
        renamed.violations(tiny_llama())


def test_check_matches_other_shapes_is_a_user_error():
    masks = _llama_masks(tiny_llama(intermediate_size=48))
    with pytest.raises(DlpError, match=r"has shape \(32, 16\) in the model but \(48, 16\)"):
        masks.check_matches(tiny_llama(intermediate_size=32))
    model = tiny_llama()
    before = {n: lin.weight.detach().clone() for n, lin in prunable_linears(model).items()}
    with pytest.raises(DlpError, match="has shape"):
        masks.apply(model)
    # the check happens before any weight is touched
    assert all(torch.equal(lin.weight, before[n]) for n, lin in prunable_linears(model).items())


# --- stats ------------------------------------------------------------------------------------------------------------
class _TwoInputs(nn.Module):
    """``a`` and ``b`` read the same tensor ``x``; ``c`` reads ``y``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 2), nn.Linear(3, 4), nn.Linear(3, 1)

    def forward(self, x, y):
        return self.a(x), self.b(x), self.c(y)


X1 = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]])  # [batch 1, 2 tokens, 3]
X2 = torch.tensor([[[2.0, 0.0, 2.0]]])  # 1 token
Y = torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])  # 3 tokens (2-D input)


def _reducer_of(linear: nn.Linear) -> _SharedReducer:
    (hook,) = linear._forward_pre_hooks.values()
    found = [cell.cell_contents for cell in hook.__closure__ if isinstance(cell.cell_contents, _SharedReducer)]
    assert len(found) == 1
    return found[0]


def test_collect_input_stats_hand_case():
    module = _TwoInputs()
    linears = {"a": module.a, "b": module.b, "c": module.c}
    with collect_input_stats(linears, want_xtx=True) as stats:
        reducer = _reducer_of(module.a)
        module(X1, Y)
        module(X2, Y * 2)
        hits = reducer.cache_hits
    # x tokens: [1,2,0], [0,1,-1], [2,0,2] -> Σx² = [1+0+4, 4+1+0, 0+1+4] = [5, 5, 5]
    assert stats["a"].tokens == stats["b"].tokens == 3
    assert stats["a"].sq_sum.tolist() == [5.0, 5.0, 5.0] == stats["b"].sq_sum.tolist()
    assert stats["a"].sq_sum.dtype == torch.float64
    assert stats["a"].sq_mean.tolist() == pytest.approx([5 / 3, 5 / 3, 5 / 3])
    assert stats["a"].sq_mean.dtype == torch.float32
    # XᵀX = [[1,2,0],[2,5,-1],[0,-1,1]] + [[4,0,4],[0,0,0],[4,0,4]]
    xtx = [[5.0, 2.0, 4.0], [2.0, 5.0, -1.0], [4.0, -1.0, 5.0]]
    assert stats["a"].xtx.tolist() == xtx == stats["b"].xtx.tolist()
    assert torch.allclose(stats["a"].hessian, torch.tensor(xtx) * (2 / 3))
    # y: [3,0,1], [1,1,1], [0,2,0], then 2y: Σy² = [10, 5, 2] · (1 + 4)
    assert stats["c"].tokens == 6
    assert stats["c"].sq_sum.tolist() == [50.0, 25.0, 10.0]
    assert stats["c"].xtx.tolist() == [[50.0, 5.0, 20.0], [5.0, 25.0, 5.0], [20.0, 5.0, 10.0]]
    assert stats["c"].in_features == 3
    # per forward: a reduces x, b reuses it, c reduces y -> one cache hit per forward
    assert hits == 2
    for lin in linears.values():  # hooks removed on exit
        assert len(lin._forward_pre_hooks) == 0


def test_collect_input_stats_matches_explicit_sums_random():
    gen = torch.Generator().manual_seed(0)
    module = _TwoInputs()
    xs = [torch.randn(2, 5, 3, generator=gen) for _ in range(3)]
    ys = [torch.randn(4, 3, generator=gen) for _ in range(3)]
    with collect_input_stats({"a": module.a, "b": module.b, "c": module.c}, want_xtx=True) as stats:
        for x, y in zip(xs, ys):
            module(x, y)
    flat_x = torch.cat([x.reshape(-1, 3) for x in xs])
    flat_y = torch.cat(ys)
    assert stats["a"].tokens == 30 and stats["c"].tokens == 12
    assert torch.allclose(stats["b"].sq_sum, (flat_x.double() ** 2).sum(0))
    assert torch.allclose(stats["c"].sq_sum, (flat_y.double() ** 2).sum(0))
    assert torch.allclose(stats["a"].xtx, flat_x.T @ flat_x, atol=1e-5)
    assert torch.allclose(stats["c"].xtx, flat_y.T @ flat_y, atol=1e-5)


def test_collect_input_stats_without_xtx_and_hooks_removed_on_error():
    module = _TwoInputs()
    with pytest.raises(RuntimeError, match="boom"):
        with collect_input_stats({"a": module.a, "c": module.c}) as stats:
            module(X1, Y)
            raise RuntimeError("boom")
    assert stats["a"].xtx is None and stats["a"].tokens == 2
    assert stats["a"].sq_sum.tolist() == [1.0, 5.0, 1.0]
    assert len(module.a._forward_pre_hooks) == 0 and len(module.c._forward_pre_hooks) == 0
    module(X1, Y)  # after the block, forwards are not counted any more
    assert stats["a"].tokens == 2


def test_shared_reducer_reuses_only_the_same_tensor():
    reducer = _SharedReducer()
    x = X1.clone()
    first = reducer.reduce(x, want_xtx=False)
    assert first.tokens == 2 and first.sq_sum.tolist() == [1.0, 5.0, 1.0] and first.xtx is None
    assert reducer.reduce(x, want_xtx=False) is first and reducer.cache_hits == 1
    # the same tensor, now with XᵀX wanted: the cached result has none, so it is computed again
    with_xtx = reducer.reduce(x, want_xtx=True)
    assert reducer.cache_hits == 1
    assert with_xtx.xtx.tolist() == [[1.0, 2.0, 0.0], [2.0, 5.0, -1.0], [0.0, -1.0, 1.0]]
    # a result with XᵀX serves a request without it
    assert reducer.reduce(x, want_xtx=False) is with_xtx and reducer.cache_hits == 2
    # an equal but distinct tensor is reduced again (identity, not equality)
    other = reducer.reduce(x.clone(), want_xtx=True)
    assert other is not with_xtx and reducer.cache_hits == 2
    assert other.sq_sum.tolist() == [1.0, 5.0, 1.0]


def test_stats_hook_with_a_shared_reducer_counts_hits():
    module = _TwoInputs()
    reducer = _SharedReducer()
    stats = {n: InputStats(3) for n in "abc"}
    handles = [getattr(module, n).register_forward_pre_hook(stats_hook(stats[n], reducer)) for n in "abc"]
    try:
        for _ in range(3):
            module(X1, Y)
    finally:
        for handle in handles:
            handle.remove()
    assert reducer.cache_hits == 3  # b, once per forward
    assert stats["b"].tokens == 6 and stats["b"].sq_sum.tolist() == [3.0, 15.0, 3.0]
    assert stats["c"].tokens == 9 and stats["c"].sq_sum.tolist() == [30.0, 15.0, 6.0]


def test_shared_reducer_adds_windows_in_float64_hand_case():
    """Window sums 2²⁴ and 3 are added in float64: 2²⁴ + 3 (float32 would round it to 2²⁴ + 4)."""
    windows = torch.tensor([[[4096.0], [0.0], [0.0]], [[1.0], [1.0], [1.0]]])  # [2 windows, 3 tokens, 1]
    reduced = _SharedReducer().reduce(windows, want_xtx=False)
    assert reduced.tokens == 6 and reduced.sq_sum.tolist() == [2.0**24 + 3]
    assert torch.tensor(2.0**24 + 3, dtype=torch.float32).item() == 2.0**24 + 4
    flat = _SharedReducer().reduce(torch.tensor([[4096.0], [0.0], [0.0]]), want_xtx=False)  # 2-D: one window
    assert flat.tokens == 3 and flat.sq_sum.tolist() == [2.0**24]


def test_statistics_do_not_depend_on_how_windows_are_grouped_into_forwards():
    """The same windows through one forward of 8, or forwards of 1, 3 and 4, give bit-identical sums: otherwise the
    micro-batch size changes the last bits of ‖X‖, and sequential pruning amplifies that into ~1% of mask bits."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 512, 16, generator=gen) * torch.logspace(-3, 3, 16)
    whole = _SharedReducer().reduce(x, want_xtx=False).sq_sum
    for sizes in ([1] * 8, [3, 5], [4, 4]):
        stats = InputStats(16)
        for part in x.split(sizes):
            stats.add(_SharedReducer().reduce(part, want_xtx=False))
        assert torch.equal(stats.sq_mean, whole.div(8 * 512).float())
        assert torch.allclose(stats.sq_sum, whole, rtol=1e-15, atol=0)


# --- data: windows ----------------------------------------------------------------------------------------------------
def test_sample_windows_hand_case_single_possible_start():
    # 5 tokens, windows of 4: the only start is 0
    out = sample_windows(torch.arange(5), 3, 4, seed=123)
    assert out.tolist() == [[0, 1, 2, 3]] * 3


def test_sample_windows_seeded_and_inside_the_stream():
    stream = torch.arange(100, 140)  # 40 tokens
    a = sample_windows(stream, 50, 8, seed=7)
    b = sample_windows(stream, 50, 8, seed=7)
    c = sample_windows(stream, 50, 8, seed=8)
    assert a.shape == (50, 8) and a.dtype == stream.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    starts = set()
    for row in a.tolist():
        start = row[0] - 100
        assert row == list(range(100 + start, 100 + start + 8))  # a contiguous slice of the stream
        assert 0 <= start and start + 8 <= 40
        starts.add(start)
    assert len(starts) > 10  # the starts are spread over the 32 possible ones


def test_sample_windows_rejects_too_short_streams_and_bad_sizes():
    with pytest.raises(DlpError, match="fewer than seqlen=8"):
        sample_windows(torch.arange(8), 1, 8, seed=0)
    with pytest.raises(DlpError, match="nsamples must be"):
        sample_windows(torch.arange(100), 0, 8, seed=0)
    with pytest.raises(DlpError, match="seqlen >= 2"):
        sample_windows(torch.arange(100), 1, 1, seed=0)


def test_consecutive_windows_hand_case():
    stream = torch.arange(10)
    assert consecutive_windows(stream, 3, None).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert consecutive_windows(stream, 3, 2).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert consecutive_windows(stream, 3, 99).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert consecutive_windows(stream, 5, None).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert consecutive_windows(stream, 10, None).tolist() == [list(range(10))]
    with pytest.raises(DlpError, match="fewer than seqlen=11"):
        consecutive_windows(stream, 11, None)


# --- data: sources ----------------------------------------------------------------------------------------------------
def test_read_text_txt_file_is_taken_as_it_is(tmp_path):
    (tmp_path / "a.txt").write_bytes(b" = Title = \n\nFirst line .\r\nSecond line .\n \n")
    assert read_text(str(tmp_path / "a.txt")) == " = Title = \n\nFirst line .\nSecond line .\n \n"
    (tmp_path / "b.raw").write_text("x\ny", encoding="utf-8")
    assert read_text(str(tmp_path / "b.raw")) == "x\ny"
    (tmp_path / "c.tokens").write_text("é <unk>\n", encoding="utf-8")
    assert read_text(str(tmp_path / "c.tokens")) == "é <unk>\n"


def test_read_text_other_suffix_is_a_user_error(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DlpError, match="must end in .jsonl"):
        read_text(str(tmp_path / "data.csv"))


def test_read_text_jsonl_rows_joined_with_blank_lines(tmp_path):
    rows = [{"text": "first doc", "id": 1}, {"text": "second\nline"}, {"text": ""}, {"text": 7}]
    (tmp_path / "d.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]) + "\n"
    )
    assert read_text(str(tmp_path / "d.jsonl")) == "first doc\n\nsecond\nline\n\n\n\n7"
    (tmp_path / "e.jsonl").write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    assert read_text(str(tmp_path / "e.jsonl"), text_field="body") == "x\n\ny"


def test_read_text_jsonl_missing_field_is_a_user_error(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "no"}) + "\n")
    with pytest.raises(DlpError, match=r"d.jsonl:2 has no field 'text'"):
        read_text(str(tmp_path / "d.jsonl"))


def test_unknown_builtin_source_is_a_user_error():
    with pytest.raises(DlpError, match="builtin:xyz"):
        read_text("builtin:xyz")


def test_builtin_wikitext2_test_is_the_raw_test_split():
    text = read_text("builtin:wikitext2-test")
    assert text.startswith(" = Robert Boulter = \n Robert Boulter is an English film")
    assert "\r" not in text
    assert len(text.splitlines()) == 2891  # one paragraph per line, no blank lines
    # the shipped file is wikitext-2-raw-v1 `test` byte for byte (CRLF line ends), see builtin_data/README.md
    raw = text.replace("\n", "\r\n").encode("utf-8")
    assert hashlib.sha256(raw).hexdigest() == "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"


def test_builtin_wikitext2_valid():
    text = read_text("builtin:wikitext2-valid")
    assert text.startswith(" \n = Homarus gammarus = \n \n Homarus gammarus , known as the European lobster")
    assert "<unk>" in text and len(text.splitlines()) == 3760


def test_mask_bits_one_layout_hand_cases_and_numpy_packbits():
    """One bit layout for the file, the digest and mask-exact LoRA: row-major, MSB first, zero-padded at the end."""

    from dlp.masks import _pack_bits_torch, _unpack_bits_torch, pack_bits, unpack_bits

    assert pack_bits(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)).tolist() == [0b10110000, 0b10000000]
    assert pack_bits(torch.tensor([[1, 0, 1], [1, 0, 0]], dtype=torch.bool)).tolist() == [
        0b10110000
    ]  # flat, not per row
    g = torch.Generator().manual_seed(0)
    for shape in ((5, 1), (5, 7), (3, 8), (4, 13), (2, 64)):
        mask = torch.rand(*shape, generator=g) < 0.4
        bits = pack_bits(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == (mask.numel() + 7) // 8
        assert bits.numpy().tobytes() == np.packbits(mask.numpy().astype(np.uint8)).tobytes()  # the files' layout
        assert torch.equal(unpack_bits(bits, shape), mask)
        assert torch.equal(_pack_bits_torch(mask), bits)  # the accelerator path: the same bytes
        assert torch.equal(_unpack_bits_torch(bits, shape), mask)
