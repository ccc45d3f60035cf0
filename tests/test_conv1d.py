"""GPT-2's ``Conv1D`` projections store their weight transposed (``[in, out]``, ``y = x @ W + b``). dlp reads every
projection in the logical ``[out, in]`` orientation, so a Conv1D must get exactly what an ``nn.Linear`` holding the
transposed weight gets: the same masks from every criterion, the same mask-exact LoRA forward and gradients (to
float32 rounding where the two layouts run different GEMMs), and the same merged weights. Checked by hand on small
cases, against a Linear twin, and on a tiny GPT-2."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from conftest import tiny_model, tiny_tokenizer
from dlp.criteria import PruneSpec, prune_linear
from dlp.pruner import prune_model
from dlp.lora import attach_masks, lora_layers
from dlp.masks import MaskSet
from dlp.merge import MERGE_TOLERANCE, merge_masked
from dlp.modeling import find_decoder_layers, prunable_linears
from dlp.criteria import Pattern
from dlp.stats import collect_input_stats
from dlp.projections import in_features, is_transposed, logical_shape, logical_weight, to_storage
from test_lora import train_steps


def conv1d(in_features: int, out_features: int, stored: torch.Tensor | None = None) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(out_features, in_features)  # (nf = out, nx = in): weight [in, out]
    if stored is not None:
        with torch.no_grad():
            conv.weight.copy_(stored)
            conv.bias.zero_()
    return conv


def linear_twin(conv: nn.Module) -> nn.Linear:
    """An nn.Linear computing the same function as ``conv``: its weight is the Conv1D's, transposed."""
    out_features, in_features_ = logical_shape(conv)
    linear = nn.Linear(in_features_, out_features)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear


def random_pair(in_features_: int = 16, out_features: int = 8, seed: int = 0) -> tuple[nn.Module, nn.Linear]:
    torch.manual_seed(seed)
    conv = conv1d(in_features_, out_features)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    return conv, linear_twin(conv)


def test_weight_helpers_read_a_conv1d_as_out_by_in():
    conv = conv1d(3, 2, torch.tensor([[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]))  # stored [in = 3, out = 2]
    assert is_transposed(conv) and not is_transposed(nn.Linear(3, 2))
    assert logical_shape(conv) == (2, 3) and in_features(conv) == 3
    weight = logical_weight(conv)
    assert weight.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    with torch.no_grad():
        weight.mul_(torch.tensor([[True, False, True], [False, True, False]]))  # writes through the view
    assert conv.weight.tolist() == [[1.0, 0.0], [0.0, 5.0], [3.0, 0.0]]
    assert to_storage(conv, weight).data_ptr() == conv.weight.data_ptr()
    assert logical_weight(conv, torch.float64).dtype == torch.float64


def test_magnitude_and_wanda_masks_of_a_conv1d_by_hand():
    logical = torch.tensor([[1.0, -3.0, 0.5, 2.0], [4.0, 0.1, -0.2, 3.0]])  # [out = 2, in = 4]
    # magnitude, half of each output row: row 0 keeps |-3|, |2|; row 1 keeps |4|, |3|
    conv = conv1d(4, 2, logical.t())
    keep = prune_linear(conv, None, 0.5, PruneSpec("magnitude"))
    assert keep.tolist() == [[False, True, False, True], [True, False, False, True]]
    assert torch.equal(conv.weight, (logical * keep).t())
    # Wanda with one token x = [1, 0.1, 10, 1]: ‖X_j‖ = |x_j|, scores [[1, .3, 5, 2], [4, .01, 2, 3]]
    conv = conv1d(4, 2, logical.t())
    with collect_input_stats({"proj": conv}) as stats:
        conv(torch.tensor([[1.0, 0.1, 10.0, 1.0]]))
    keep = prune_linear(conv, stats["proj"], 0.5, PruneSpec("wanda"))
    assert keep.tolist() == [[False, False, True, True], [True, False, False, True]]
    assert torch.equal(conv.weight, (logical * keep).t())


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)], ids=str)
def test_conv1d_and_its_linear_twin_prune_identically(criterion, pattern):
    conv, linear = random_pair()
    x = torch.randn(4, 20, 16, generator=torch.Generator().manual_seed(1))
    with collect_input_stats({"conv": conv, "linear": linear}, want_xtx=criterion == "sparsegpt") as stats:
        conv(x)
        linear(x)
    spec = PruneSpec(criterion, pattern, sparsegpt_blocksize=8)
    keep_conv = prune_linear(conv, stats["conv"], 0.6, spec)
    keep_linear = prune_linear(linear, stats["linear"], 0.6, spec)
    assert keep_conv.shape == (8, 16) and torch.equal(keep_conv, keep_linear)
    # SparseGPT's weight updates included, bit for bit: its solver runs on a contiguous copy of the logical weight and
    # on the same statistics, so the same kernels on the same data (masking and scores are elementwise)
    assert torch.equal(conv.weight.t(), linear.weight)


class _One(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _lora(proj: nn.Module, keep: torch.Tensor, r: int = 2, lora_a=None, lora_b=None) -> tuple[nn.Module, nn.Module]:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")  # right setting: nothing to correct
        net = get_peft_model(
            _One(proj), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], fan_in_fan_out=is_transposed(proj))
        )
    layer = lora_layers(net)["proj"]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_a if lora_a is not None else torch.randn(r, keep.shape[1]))
        layer.lora_B["default"].weight.copy_(lora_b if lora_b is not None else torch.randn(keep.shape[0], r))
    assert attach_masks(net, MaskSet({"proj": keep})) == 1
    return net, layer


def test_masked_lora_on_a_conv1d_by_hand():
    """The hand-computed case of tests/test_lora.py with the weight stored transposed: the same y; the delta peft
    merges comes back transposed, in the Conv1D's own layout."""
    keep = torch.tensor([[True, False, True], [False, True, False]])
    conv = conv1d(3, 2, torch.tensor([[1.0, 0.0], [0.0, -1.0], [2.0, 0.0]]))  # logical [[1, 0, 2], [0, -1, 0]]
    net, layer = _lora(conv, keep, r=1, lora_a=torch.tensor([[1.0, 2.0, 3.0]]), lora_b=torch.tensor([[1.0], [-1.0]]))
    # W_eff = [[3, 0, 8], [0, -5, 0]] (logical); x = [1, 1, 1] → y = [11, -5]
    assert net(torch.ones(1, 3)).tolist() == [[11.0, -5.0]]
    assert layer.get_delta_weight("default").tolist() == [[2.0, 0.0], [0.0, -4.0], [6.0, 0.0]]
    merged = net.merge_and_unload()
    assert merged.proj.weight.tolist() == [[3.0, 0.0], [0.0, -5.0], [8.0, 0.0]]
    assert merged(torch.ones(1, 3)).tolist() == [[11.0, -5.0]]


def test_masked_lora_on_a_conv1d_matches_its_linear_twin_forward_backward_and_merge():
    conv, linear = random_pair()
    keep = torch.rand(8, 16, generator=torch.Generator().manual_seed(2)) < 0.3
    with torch.no_grad():
        logical_weight(conv).mul_(keep)
        linear.weight.mul_(keep)
    torch.manual_seed(3)
    lora_a, lora_b = torch.randn(2, 16), torch.randn(8, 2)
    nets = [_lora(proj, keep, lora_a=lora_a, lora_b=lora_b) for proj in (conv, linear)]
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(4))
    results = []
    for net, layer in nets:
        x_in = x.clone().requires_grad_(True)
        y = net(x_in)
        (y * torch.arange(8.0)).sum().backward()
        adapter_grads = (layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad)
        results.append((y.detach(), x_in.grad, *adapter_grads))
    # y and dL/dx multiply by W_eff, which the Conv1D holds [in, out] and the Linear [out, in]: two GEMM layouts
    # that sum in different orders, so their last bits differ on some CPUs (an AVX2 or AVX-512 EPYC; not on an AMX
    # Xeon). Dot products of 16 (y) and 8 (dL/dx) float32 terms with Σ|terms| ≤ 25: differences of a few 1e-7
    # (5e-7 measured on y), and 1e-5 bounds them; a wrong mask or transpose would be off by O(1).
    for ours, theirs in zip(results[0][:2], results[1][:2]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the adapter's gradients never read W: (dYᵀX ⊙ M)·Aᵀ and Bᵀ·(dYᵀX ⊙ M) from the same dY, X, A, B and mask in
    # both layouts, the same kernels on the same data, so bit for bit
    for ours, theirs in zip(results[0][2:], results[1][2:]):
        assert torch.equal(ours, theirs)
    # the adapter's gradient lives on the mask only: dL/d(B·A) ⊙ M, the same for both layouts
    assert results[0][2].abs().sum() > 0
    merged = [net.merge_and_unload() for net, _ in nets]
    # the merge adds the same masked delta (one s·B·A product, then ⊙ M) to the same weights: bit for bit
    assert torch.equal(merged[0].proj.weight.t(), merged[1].proj.weight)
    assert (merged[1].proj.weight[~keep] == 0).all()
    # the merged Conv1D computes x @ W + b (addmm) where the adapter layer ran F.linear: other kernels, same bound
    torch.testing.assert_close(merged[0](x), results[0][0], atol=1e-5, rtol=1e-5)


def test_gpt2_prunes_to_out_by_in_masks_and_merges_exactly():
    from trl import ModelConfig

    from dlp.lora import masked_lora_model

    model = tiny_model("gpt2")
    prefix, layers = find_decoder_layers(model)
    projections = prunable_linears(model)
    assert prefix == "transformer.h" and len(projections) == 4 * len(layers)
    assert all(is_transposed(module) for module in projections.values())
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    masks = prune_model(model, ids, [0.7] * len(layers), PruneSpec("wanda"))
    assert masks.masks["transformer.h.0.attn.c_attn"].shape == (96, 32)  # stored [32, 96]
    assert masks.masks["transformer.h.0.mlp.c_proj"].shape == (32, 64)  # stored [64, 32]
    assert masks.violations(model) == 0 and abs(masks.sparsity_report()["overall"] - 0.7) < 0.01
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")
        peft_model = masked_lora_model(model, masks, ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    train_steps(peft_model)
    probe = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    merged, check = merge_masked(peft_model, masks, probe)
    assert check.lora_layers == len(projections) and check.violations == 0
    assert check.max_logit_diff <= MERGE_TOLERANCE
    assert is_transposed(merged.transformer.h[0].attn.c_attn)  # still GPT-2's own module, loadable as such


def test_conv1d_masks_match_the_4bit_linear_that_replaces_it_and_dequantizing_restores_the_conv1d(tmp_path):
    """A 4-bit load turns every Conv1D into a Linear4bit in [out, in] layout: logical masks still match. The
    dequantized base (``merge_base: dequantized``) must be GPT-2's own Conv1D model again, holding exactly the
    values the 4-bit layers computed with, or its export would not load back as GPT-2."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from dlp.merge import load_base
    from dlp.projections import dense_weight

    model = tiny_model("gpt2")
    masks = prune_model(model, None, [0.7] * 3, PruneSpec("magnitude"))
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32)
    layer = quantized.transformer.h[0].attn.c_attn
    assert not is_transposed(layer) and logical_shape(layer) == (96, 32)
    assert masks.violations(quantized) == 0
    dequantized, _ = load_base(tmp_path, merge_base="dequantized", quantization=config.to_dict())
    for name, module in prunable_linears(dequantized).items():
        assert is_transposed(module), name
        assert torch.equal(logical_weight(module), dense_weight(quantized.get_submodule(name).weight)), name
    assert masks.violations(dequantized) == 0
