"""Compressed exports (mask bits + kept values) and the CPU kernel that multiplies on them.

The kernel is held to ``F.linear`` on the dense weight (exact up to the order of float summation), the format to
hand-made bytes, and the export to the dense export: bitwise equal after decompression with values in the model's
dtype, for every family (GPT-2's Conv1D included) and for N:M masks, loadable without dlp.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ALL_FAMILIES, REPO, tiny_model, tiny_tokenizer
from dlp.compress import checkpoint_sizes, compress_projection, export_compressed, quantize_values
from dlp.compressed import SparseLinear, is_compressed_checkpoint, load_compressed
from dlp.compressed import modeling_compressed as mc
from dlp.compressed import sparse_kernel
from dlp.export import export_model
from dlp.masks import MaskSet, pack_bits
from dlp.modeling import prunable_linears
from dlp.projections import logical_weight

needs_kernel = pytest.mark.skipif(sparse_kernel.kernel_unavailable() is not None, reason="no C++ compiler or AVX2")


def sparse_layer(weight: torch.Tensor, mask: torch.Tensor, values: str = "model", group_size: int = 0):
    stored, spec = compress_projection(weight * mask, mask, values, group_size)
    return SparseLinear(stored, spec, None, weight.dtype), stored, spec


def random_case(out: int, inn: int, seed: int = 0, density: float = 0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inn, generator=g).to(dtype)
    mask = torch.rand(out, inn, generator=g) < density
    mask[0] = True  # a fully kept row
    mask[min(1, out - 1)] = False  # a fully pruned row
    return weight, mask


def test_the_format_on_a_hand_made_weight():
    weight = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 2.0, 3.0, 0], [0, 4.0, 0, 0, 0, 0, 0, 0, 0, 5.0]])
    mask = weight != 0
    stored, spec = compress_projection(weight, mask, "model", 0)
    # the 20 bits row after row, most significant first: 10000001 10|010000 0001|0000 (row 2 starts mid-byte)
    assert stored["mask"].tolist() == [0b10000001, 0b10010000, 0b00010000]
    assert stored["values"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0] and spec == {"shape": [2, 10], "values": "float32"}
    assert torch.equal(mc.dense_weight(stored, spec, torch.float32), weight)
    # the kernel's rows start on a byte, least significant bit first: row 2's bits are repacked
    assert mc.row_bits(stored["mask"], (2, 10)).tolist() == [[0b10000001, 0b00000001], [0b00000010, 0b00000010]]


def test_nf4_codes_are_packed_low_nibble_first_and_decode_through_the_codebook():
    weight = torch.tensor([[0.0, 1.0, -1.0, 0.5, 0, 0, 0, 0]])
    mask = weight != 0
    stored, spec = compress_projection(weight, mask, "nf4", 32)
    codebook = torch.tensor(spec["codebook"])
    codes = [int(torch.argmin((codebook - v).abs())) for v in (1.0, -1.0, 0.5)]  # absmax 1: the levels themselves
    assert stored["values"].tolist() == [codes[0] | codes[1] << 4, codes[2]]
    assert stored["scales"].tolist() == [[1.0]] and spec["group_size"] == 32
    decoded = mc.dense_weight(stored, spec, torch.float32)
    assert torch.equal(decoded[mask], codebook[codes]) and (decoded[~mask] == 0).all()


def test_int4_is_the_symmetric_uniform_grid_on_a_hand_made_row(monkeypatch):
    import dlp.compress

    monkeypatch.setattr(dlp.compress, "INT4_CLIPS", (1.0,))  # the grid alone; the range search is tested below
    weight = torch.tensor([[0.5, -0.25, 0.0, 0.03125, 0.1875, 0, 0, 0]])  # exact in binary
    mask = weight != 0
    stored, spec = compress_projection(weight, mask, "int4", 32)
    # round(w · 7 / 0.5) = 7, -3.5 → -4 (half to even), 0.4375 → 0, 2.625 → 3; stored as q + 8, low nibble first
    assert stored["values"].tolist() == [15 | 4 << 4, 8 | 11 << 4]
    decoded = mc.dense_weight(stored, spec, torch.float32)
    assert stored["scales"].tolist() == [[0.5]]
    assert torch.allclose(decoded[mask], torch.tensor([7.0, -4, 0, 3]) / 7 * 0.5)


def test_int4_ranges_are_chosen_for_the_least_rounding_error():
    from dlp.compress import INT4_CLIPS, _int4_steps

    # one outlier: the full range rounds every other weight to a coarse step; a clipped one wins
    block = torch.tensor([[1.0, 0.21, -0.33, 0.4, 0.12, -0.27, 0.05, 0.36]])
    step = _int4_steps(block)

    def error(s):
        return float((block - torch.round(block / s * 7).clamp(-7, 7) * s / 7).square().sum())

    candidates = [float(torch.tensor(clip).half()) for clip in INT4_CLIPS]  # max |w| = 1: the step is the clip
    assert float(step) < 1.0 and error(float(step)) == min(error(c) for c in candidates)
    assert _int4_steps(torch.zeros(1, 8)).tolist() == [0.0]  # an all-pruned block


@pytest.mark.parametrize("values", ["int8", "nf4"])
def test_quantized_values_are_bitsandbytes_codes(values):
    """The codes are bitsandbytes' own (its dequantization of them agrees with ours up to the float16 step)."""
    import bitsandbytes.functional as bnb

    weight, mask = random_case(6, 64, seed=3)
    codes, steps, group, codebook = quantize_values(weight, mask, values, 32)
    blocks = (weight * mask).reshape(-1, 32)
    if values == "int8":
        code_all, absmax, _ = bnb.int8_vectorwise_quant(blocks)
        reference = code_all.float() * absmax[:, None] / 127
    else:
        packed, state = bnb.quantize_4bit(blocks.reshape(-1), blocksize=32, quant_type="nf4", compress_statistics=False)
        reference = bnb.dequantize_4bit(packed, state).float()
    stored, spec = compress_projection(weight * mask, mask, values, 32)
    ours = mc.dense_weight(stored, spec, torch.float32)
    assert group == 32 and steps.dtype == torch.float16 and steps.shape == (6, 2)
    assert torch.allclose(ours, reference.reshape(6, 64) * mask, rtol=2e-3, atol=0)  # the float16 step: 2^-11


@needs_kernel
@pytest.mark.parametrize("shape", [(37, 45), (16, 8), (5, 13), (64, 576)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_f_linear_for_every_token_count(shape, dtype):
    weight, mask = random_case(*shape, seed=shape[0], dtype=dtype)
    layer, _, _ = sparse_layer(weight, mask)
    dense = (weight * mask).float()
    for tokens in range(1, 9):
        x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            y = layer(x.to(dtype)).float()
        expected = F.linear(x.to(dtype).float(), dense)
        # fp32 accumulation in another order, then one rounding to the output dtype
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(y, expected, rtol=tolerance, atol=tolerance * 4), (tokens, (y - expected).abs().max())


@needs_kernel
@pytest.mark.parametrize("values,group", [("int8", 0), ("int8", 32), ("int4", 0), ("int4", 64), ("nf4", 64)])
def test_kernel_on_quantized_values_equals_the_decompressed_weight(values, group):
    weight, mask = random_case(24, 200, seed=7)
    layer, stored, spec = sparse_layer(weight, mask, values, group)
    reference = mc.dense_weight(stored, spec, torch.float32)  # pure torch, no kernel
    assert torch.equal(layer.weight_dense(torch.float32), reference)  # the kernel's decompression
    x = torch.randn(3, 200)
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, reference), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_on_the_masks_dlp_prunes(calib_ids):
    """Real masks (Wanda on a tiny Llama, 2:4 and unstructured): every projection's SparseLinear equals F.linear."""
    from dlp.criteria import PruneSpec, parse_pattern
    from dlp.pruner import prune_model

    for pattern, sparsity in (("unstructured", 0.7), ("2:4", 0.5)):
        model = tiny_model("llama")
        masks = prune_model(model, calib_ids, [sparsity] * 3, PruneSpec("wanda", parse_pattern(pattern)))
        for name, keep in masks.masks.items():
            weight = logical_weight(model.get_submodule(name)).detach()
            layer, _, _ = sparse_layer(weight, keep)
            x = torch.randn(2, weight.shape[1])
            with torch.no_grad():
                assert torch.allclose(layer(x), F.linear(x, weight), atol=1e-5), (pattern, name)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decompression_into_16_bit_rounds_as_torch_does(dtype):
    """Quantized values scaled in float32, then rounded to the model's 16-bit dtype by the kernel's own store."""
    weight, mask = random_case(16, 64, seed=9)
    layer, stored, spec = sparse_layer(weight, mask, "int8", 32)
    expected = mc.dense_weight(stored, spec, torch.float32).to(dtype)
    assert torch.equal(layer.weight_dense(dtype), expected)


@needs_kernel
def test_more_than_eight_tokens_use_the_dense_kernel_on_the_decompressed_weight():
    weight, mask = random_case(32, 48, seed=2)
    layer, _, _ = sparse_layer(weight, mask)
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, weight * mask))


def test_without_a_kernel_each_layer_is_decompressed_once_and_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sparse_kernel._state, "problem", "no C++ compiler (c++) on PATH")
    monkeypatch.setattr(mc, "_said", set())
    weight, mask = random_case(8, 16, seed=4)
    layer, _, _ = sparse_layer(weight, mask)
    x = torch.randn(1, 16)
    with torch.no_grad():
        first, second = layer(x), layer(x)
    assert torch.equal(first, F.linear(x, weight * mask)) and torch.equal(first, second)
    assert layer.dense is not None
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "[dlp] sparse kernel not used (no C++ compiler (c++) on PATH): each layer decompressed once, dense kernel"
    ]


def pruned_tiny(family: str, nm: bool = False):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(1)
    masks = {}
    for name, module in prunable_linears(model).items():
        shape = logical_weight(module).shape
        if nm:  # 2:4 along each row
            scores = torch.rand(shape, generator=g).view(shape[0], -1, 4)
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(2, dim=2).indices, True)
            masks[name] = keep.view(shape)
        else:
            masks[name] = torch.rand(shape, generator=g) > 0.7
    mask_set = MaskSet(masks, {"model": family})
    mask_set.apply(model)
    return model, mask_set


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_reloads_bitwise_equal_to_the_dense_export(family, tmp_path):
    model, masks = pruned_tiny(family, nm=family == "llama")
    tokenizer = tiny_tokenizer()
    export_model(model, tokenizer, masks, tmp_path / "dense")
    export_compressed(model, tokenizer, masks, tmp_path / "compressed")
    assert is_compressed_checkpoint(tmp_path / "compressed") and not is_compressed_checkpoint(tmp_path / "dense")
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    reloaded = load_compressed(tmp_path / "compressed", "dense")
    assert type(reloaded) is type(dense)
    ours, theirs = reloaded.state_dict(), dense.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    sparse = load_compressed(tmp_path / "compressed", "sparse")
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == len(masks.masks)
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(sparse(ids).logits, dense(ids).logits, atol=1e-4)


def test_the_export_is_deterministic_and_smaller(tmp_path):
    model, masks = pruned_tiny("llama")
    for name in ("a", "b"):
        export_compressed(model, tiny_tokenizer(), masks, tmp_path / name)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    sizes = checkpoint_sizes(tmp_path / "a")
    # float32 values at 70%: 0.3 · 4 / 2 + 1/16 of the projections' bf16 bytes, plus the rows' padding
    assert 0.66 <= sizes["projection_ratio"] <= 0.70, sizes
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert meta["model_type"] == "dlp_compressed" and meta["base_config"]["model_type"] == "llama"


def test_weights_outside_the_masks_are_refused(tmp_path):
    model, masks = pruned_tiny("llama")
    name = next(iter(masks.masks))
    with torch.no_grad():
        model.get_submodule(name).weight[~masks.masks[name]] = 1.0
    from dlp.errors import DlpError

    with pytest.raises(DlpError, match="nonzero weights outside its mask"):
        export_compressed(model, tiny_tokenizer(), masks, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_loads_without_dlp_through_the_remote_code_in_both_modes(tmp_path):
    model, masks = pruned_tiny("gpt2")
    export_compressed(model, tiny_tokenizer(), masks, tmp_path / "c")
    ids = [[5, 9, 14, 2]]
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
import sys; sys.modules["dlp"] = None  # import dlp fails in this process
import torch
from transformers import AutoModelForCausalLM as M
path = {str(tmp_path / "c")!r}
expected = torch.load({str(tmp_path / "expected.pt")!r})
for mode in ("sparse", "dense"):
    m = M.from_pretrained(path, trust_remote_code=True, compressed_mode=mode)
    with torch.no_grad():
        got = m(torch.tensor({ids})).logits
    assert type(m).__name__ == "GPT2LMHeadModel", type(m)
    assert torch.allclose(got, expected, atol=1e-5), (mode, (got - expected).abs().max())
    kinds = {{type(x).__name__ for x in m.modules()}}
    assert ("SparseLinear" in kinds) == (mode == "sparse"), kinds
    print(mode, "ok")
try:
    M.from_pretrained(path, trust_remote_code=False)
except ValueError as exc:
    print("refused:", "trust_remote_code" in str(exc))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:3] == ["sparse ok", "dense ok", "refused: True"]


@needs_kernel
def test_greedy_generation_on_the_sparse_model_equals_the_dense_one(tmp_path):
    model, masks = pruned_tiny("llama")
    export_compressed(model, tiny_tokenizer(), masks, tmp_path / "c")
    sparse = load_compressed(tmp_path / "c", "sparse")
    ids = torch.randint(1, 100, (1, 12), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(sparse.generate(ids, **kwargs), model.generate(ids, **kwargs))


def test_compress_script_and_its_one_line_errors(tmp_path):
    model, masks = pruned_tiny("llama")
    export_model(model, tiny_tokenizer(), masks, tmp_path / "model")
    script = [sys.executable, str(REPO / "train" / "compress.py")]
    # a train/prune.py run keeps its masks beside model/, not inside: found there too
    (tmp_path / "run").mkdir()
    export_model(model, tiny_tokenizer(), None, tmp_path / "run" / "model")
    masks.save(tmp_path / "run" / "masks.safetensors")
    beside = subprocess.run([*script, "--model_dir", str(tmp_path / "run" / "model")], capture_output=True, text=True)
    assert beside.returncode == 0, beside.stderr[-2000:]
    assert is_compressed_checkpoint(tmp_path / "run" / "model-sparse")
    ok = subprocess.run(
        [*script, "--model_dir", str(tmp_path / "model"), "--export_values", "int8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "pruned projections" in ok.stdout and is_compressed_checkpoint(tmp_path / "model-sparse")
    for args, message in [
        (["--model_dir", str(tmp_path / "model"), "--export_values", "int3"], "export_values must be one of"),
        (
            ["--model_dir", str(tmp_path / "model"), "--export_values", "nf4", "--export_group_size", "0"],
            "export_group_size must be one of 32",
        ),
        (["--model_dir", str(tmp_path), "--output_dir", str(tmp_path / "x")], "masks: file not found"),
    ]:
        bad = subprocess.run([*script, *args], capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and message in bad.stderr, bad.stderr


def test_pack_bits_is_the_mask_file_layout():
    mask = torch.rand(7, 11) > 0.5
    stored, _ = compress_projection(torch.randn(7, 11) * mask, mask, "model", 0)
    assert torch.equal(stored["mask"], pack_bits(mask))
    assert np.array_equal(mc.unpack_mask(stored["mask"], (7, 11)).numpy(), mask.numpy())
