"""The sweep engine: captured layer inputs are exactly what the model computes, on every architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import FAMILIES, tiny_config, tiny_model
from dlp.criteria import PruneSpec
from dlp.pruner import prune_model
from dlp.scoring import score_layers
from dlp.modeling import find_decoder_layers, find_linears
from dlp.criteria import Pattern
from dlp.sweep import capture_inputs, sweep


def _layer_inputs_by_sweep(model, ids, batch_size=1):
    seen = []

    def visit(ctx):
        seen.append(ctx.inputs.clone())
        return ctx.forward()

    sweep(model, ids, visit, batch_size=batch_size)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_reproduces_model_hidden_states(family, calib_ids):
    model = tiny_model(family)
    with torch.no_grad():
        reference = model(calib_ids, output_hidden_states=True, use_cache=False).hidden_states
    seen = _layer_inputs_by_sweep(model, calib_ids, batch_size=2)
    assert len(seen) == len(find_decoder_layers(model)[1])
    for index, inputs in enumerate(seen):
        torch.testing.assert_close(inputs, reference[index], atol=1e-5, rtol=1e-5)


def test_per_layer_arguments_are_captured_for_sliding_window_layers(calib_ids):
    """Qwen2 with a sliding window on layers >= 1 passes a different mask to those layers; the sweep must too."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("qwen2")
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 4, 1
    config.layer_types = ["full_attention"] + ["sliding_attention"] * (config.num_hidden_layers - 1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        reference = model(calib_ids, output_hidden_states=True, use_cache=False).hidden_states
    seen = _layer_inputs_by_sweep(model, calib_ids)
    torch.testing.assert_close(seen[-1], reference[len(seen) - 1], atol=1e-5, rtol=1e-5)


class _TupleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden, scale=1.0):
        return (hidden + scale * torch.tanh(self.proj(hidden)), None)


class _TupleModel(nn.Module):
    """A decoder whose blocks return tuples, as older and remote-code models do."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([_TupleBlock() for _ in range(3)])

    def forward(self, input_ids, use_cache=False):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, scale=0.5)[0]
        return hidden


def test_capture_handles_layers_returning_tuples():
    torch.manual_seed(0)
    model = _TupleModel()
    ids = torch.randint(0, 16, (3, 5))
    captured = capture_inputs(model, ids, batch_size=1, device=torch.device("cpu"))
    assert captured.tuple_outputs and captured.hidden.shape == (3, 5, 8)
    assert captured.calls[0][1][1] == {"scale": 0.5}
    outputs = []
    sweep(model, ids, lambda ctx: outputs.append(ctx.forward()) or outputs[-1], captured=captured)
    torch.testing.assert_close(outputs[-1], model(ids))


def test_no_cache_reaches_the_layers(calib_ids):
    """A past_key_values cache handed to every layer call would let samples attend to each other."""
    captured = capture_inputs(tiny_model("llama"), calib_ids, batch_size=1, device=torch.device("cpu"))
    for batch in captured.calls:
        for _args, kwargs in batch:
            assert kwargs.get("past_key_values") is None and "use_cache" not in kwargs


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_every_architecture(family, calib_ids):
    model = tiny_model(family)
    scores = score_layers(model, calib_ids)
    assert len(scores) == 3 and all(0 < s.redundancy <= 1 and s.wanda_median > 0 for s in scores)
    masks = prune_model(model, calib_ids, [0.5, 0.6, 0.7], PruneSpec("wanda"))
    assert masks.violations(model) == 0
    prefix, layers = find_decoder_layers(model)
    assert len(masks.masks) == 3 * len(find_linears(layers[0]))
    report = masks.sparsity_report()["modules"]
    for name, sparsity in report.items():
        target = [0.5, 0.6, 0.7][int(name[len(prefix) + 1 :].split(".")[0])]
        assert abs(sparsity - target) < 0.02, (name, sparsity)
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids).logits).all()


def test_sequential_mode_calibrates_on_pruned_outputs(calib_ids):
    """Layer 1's Wanda statistics must come from the pruned layer 0 (the papers' sequential protocol)."""
    dense_model, pruned_model = tiny_model("llama"), tiny_model("llama")
    masks = prune_model(pruned_model, calib_ids, [0.9, 0.0, 0.0], PruneSpec("wanda"))
    reference = tiny_model("llama")
    masks_for_layer0 = {k: v for k, v in masks.masks.items() if ".0." in k}
    for name, linear in find_linears(reference).items():
        if name in masks_for_layer0:
            linear.weight.data.mul_(masks_for_layer0[name])
    with torch.no_grad():
        expected = reference(calib_ids, output_hidden_states=True).hidden_states[1]
        unpruned = dense_model(calib_ids, output_hidden_states=True).hidden_states[1]
    seen = []
    model = tiny_model("llama")

    def visit(ctx):
        seen.append(ctx.inputs.clone())
        if ctx.index == 0:
            for name, linear in ctx.linears.items():
                linear.weight.data.mul_(masks.masks[f"model.layers.0.{name}"])
        return ctx.forward()

    sweep(model, calib_ids, visit)
    torch.testing.assert_close(seen[1], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen[1], unpruned, atol=1e-3)


def test_fast_mode_prunes_from_the_dense_sweep(calib_ids):
    """Layer 0 sees the same (dense) inputs in both modes, so its masks agree; later layers need no sweep."""
    sequential = prune_model(tiny_model("llama"), calib_ids, [0.7] * 3, PruneSpec("wanda"))
    model = tiny_model("llama")
    stats = score_layers(model, calib_ids, keep_stats=True).stats
    assert len(stats) == 21 and all(s.tokens == calib_ids.numel() for s in stats.values())
    fast = prune_model(model, None, [0.7] * 3, PruneSpec("wanda"), mode="fast", stats=stats)
    assert fast.violations(model) == 0
    for name, mask in sequential.masks.items():
        if ".layers.0." in name:
            assert torch.equal(fast.masks[name], mask), name
    from dlp.errors import DlpError

    with pytest.raises(
        DlpError, match="prune_mode fast supports criterion magnitude, wanda; use onepass or sequential for sparsegpt"
    ):
        prune_model(model, None, [0.7] * 3, PruneSpec("sparsegpt"), mode="fast", stats=stats)


def test_same_seed_gives_identical_masks_and_onepass_mode_is_close(calib_ids):
    first = prune_model(tiny_model("llama"), calib_ids, [0.7] * 3, PruneSpec("wanda"))
    second = prune_model(tiny_model("llama"), calib_ids, [0.7] * 3, PruneSpec("wanda"))
    assert first.digest() == second.digest()
    fast = prune_model(tiny_model("llama"), calib_ids, [0.7] * 3, PruneSpec("wanda"), mode="onepass")
    agree = sum(int((fast.masks[k] == first.masks[k]).sum()) for k in first.masks)
    total = sum(m.numel() for m in first.masks.values())
    assert fast.sparsity_report()["overall"] == pytest.approx(first.sparsity_report()["overall"])
    assert agree / total > 0.9  # layer 0's q/k/v/gate/up see identical inputs; later Linears differ slightly


@pytest.mark.parametrize("pattern", [Pattern(2, 4), Pattern(4, 8)])
@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt", "magnitude"])
def test_nm_patterns_hold_in_every_group(pattern, criterion, calib_ids):
    model = tiny_model("llama")
    masks = prune_model(model, calib_ids, [0.5] * 3, PruneSpec(criterion, pattern))
    for mask in masks.masks.values():
        groups = mask.reshape(mask.shape[0], -1, pattern.m).sum(-1)
        assert bool((groups == pattern.n).all())
    assert masks.violations(model) == 0
