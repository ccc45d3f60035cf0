"""Rotate-and-slice (SliceGPT / Dynamic Slicing): the widths, the principal bases, exactness of the rotation,
the sliced architecture and its standalone export, and the slice → LoRA pipeline end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, requires_demo_model, tiny_model
from dlp.allocate import ranks
from dlp.errors import DlpError
from dlp.errors import ResultCheckFailed
from dlp.slicing import (
    check_slicing_mean,
    parameter_count,
    principal_basis,
    slice_model,
    sliced_widths,
    slicing_fractions,
)
from test_prune_lora import run, write_recipe

ROTATION_TOLERANCE = 1e-4  # fp32 max |logit difference| of a rotated, unsliced model


def llama_with_scaled_norms(seed: int = 0, **config):
    """A tiny random Llama whose RMSNorm scales are not all ones (so folding them is actually tested)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    fields.update(config)
    model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(1.0 + 0.5 * torch.randn_like(param) if "norm" in name else 0.1 * torch.randn_like(param))
    return model


def max_logit_diff(a, b, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


# --- widths and fractions (hand-computed)


def test_widths_keep_the_mean_fraction_where_rounding_each_layer_would_not():
    widths = sliced_widths([0.3] * 30, 576, 8)  # 0.7·576 = 403.2 = 50.4 units of 8
    assert widths == [408] * 12 + [400] * 18  # 12 remainders of 0.4 → +1 unit, earliest layers first
    assert sum(widths) / (30 * 576) == pytest.approx(0.7)
    assert sliced_widths([0.25] * 4, 576, 8) == [432] * 4
    assert sliced_widths([0.0, 0.5], 64, 8) == [64, 32]
    assert sliced_widths([0.1, 0.2, 0.3], 40, 1) == [36, 32, 28]


def test_a_mean_the_widths_cannot_reach_stops_the_run():
    """Rounding keeps the mean within one multiple: 30% of 576 over 30 layers gives 30.0%, accepted. Slicing 99%
    of a 32-wide model keeps one multiple (8) per layer, 75%: refused before any slicing, not reported as 99%."""
    assert abs(check_slicing_mean(sliced_widths([0.3] * 30, 576, 8), 576, 0.3, 8) - 0.3) < 0.001
    with pytest.raises(ResultCheckFailed, match=r"slice 75.00% of the width on average, but slicing asks 99.00%"):
        check_slicing_mean(sliced_widths([0.99] * 3, 32, 8), 32, 0.99, 8)


def test_lr_fractions_slice_the_most_redundant_layer_most_around_the_mean():
    fractions = slicing_fractions("lr", 0.25, 3, redundancy=[0.1, 0.9, 0.5], spread=0.1)
    assert fractions == pytest.approx([0.15, 0.35, 0.25])
    assert slicing_fractions("uniform", 0.3, 2) == [0.3, 0.3]
    with pytest.raises(DlpError, match="redundancy"):
        slicing_fractions("lr", 0.25, 3, redundancy=[0.1])


def test_rank_mapping_spaces_layers_evenly_where_minmax_gives_an_outlier_the_whole_spread():
    """SmolLM2's shape: layer 0 far less redundant than the rest (hand-computed)."""
    redundancy = [0.02, 0.75, 0.80, 0.98]
    minmax = slicing_fractions("lr", 0.25, 4, redundancy, spread=0.1, mapping="minmax")
    assert minmax == pytest.approx([0.121354, 0.273438, 0.283854, 0.321354], abs=1e-6)
    rank = slicing_fractions("lr", 0.25, 4, redundancy, spread=0.1, mapping="rank")
    assert rank == pytest.approx([0.15, 0.25 - 0.1 / 3, 0.25 + 0.1 / 3, 0.35])
    assert ranks([0.02, 0.9, 0.75, 0.9]) == [0.0, 2.5, 1.0, 2.5]  # ties share their mean rank
    # the released code's: r = (0, 0.7604, 0.8125, 1), mean 0.64323; 0.15 + 0.1 · r / mean(r)
    ratio = slicing_fractions("lr", 0.25, 4, redundancy, spread=0.1, mapping="ratio")
    assert ratio == pytest.approx([0.15, 0.268219, 0.276316, 0.305466], abs=1e-6)
    with pytest.raises(DlpError, match="slicing_lr_mapping must be one of minmax, rank, ratio"):
        slicing_fractions("lr", 0.25, 4, redundancy, spread=0.1, mapping="softmax")


def test_principal_basis_orders_directions_by_energy():
    gram = torch.diag(torch.tensor([1.0, 9.0, 4.0], dtype=torch.float64))
    basis = principal_basis(gram, 2)
    assert basis.shape == (3, 2)
    assert torch.allclose(basis.abs(), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    rotated = principal_basis(torch.tensor([[2.0, 1.0], [1.0, 2.0]]), 1)  # eigenvalues 3 (along [1, 1]) and 1
    assert torch.allclose(rotated.abs().flatten(), torch.full((2,), 0.5**0.5, dtype=torch.float64))


# --- exactness of the rotation and the sliced architecture


@pytest.mark.parametrize(
    "config",
    [dict(tie_word_embeddings=True), dict(tie_word_embeddings=False), dict(attention_bias=True, mlp_bias=True)],
    ids=["tied", "untied", "biases"],
)
def test_rotation_without_slicing_leaves_the_logits_unchanged(config, calib_ids):
    dense = llama_with_scaled_norms(**config)
    rotated = slice_model(dense, calib_ids, [32, 32, 32], batch_size=2)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    assert max_logit_diff(dense, rotated, ids) <= ROTATION_TOLERANCE
    assert any(
        not torch.allclose(a.weight, b.weight)
        for a, b in zip(  # it did rotate (the weights changed)
            [dense.model.layers[1].self_attn.q_proj], [rotated.model.layers[1].self_attn.q_proj]
        )
    )


def test_sliced_model_has_the_allocated_shapes_and_fewer_parameters(calib_ids):
    dense = llama_with_scaled_norms(tie_word_embeddings=True)
    sliced = slice_model(dense, calib_ids, [24, 16, 20], batch_size=4)
    block = sliced.model.layers[1]
    assert block.self_attn.q_proj.weight.shape == (32, 16) and block.self_attn.o_proj.weight.shape == (16, 32)
    assert block.mlp.gate_proj.weight.shape == (64, 16) and block.mlp.down_proj.weight.shape == (20, 64)
    assert block.attn_shortcut.weight.shape == (16, 16) and block.mlp_shortcut.weight.shape == (20, 16)
    assert sliced.model.layers[0].input_proj.weight.shape == (24, 32) and sliced.model.norm.proj.weight.shape == (
        32,
        20,
    )
    assert parameter_count(sliced, embeddings=False) < parameter_count(dense, embeddings=False)
    assert sliced.lm_head.weight is sliced.model.embed_tokens.weight  # tied embeddings stay tied
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(sliced(input_ids=ids).logits).all()


def test_slicing_does_not_depend_on_the_calibration_batch_size(calib_ids):
    dense = llama_with_scaled_norms()
    one = slice_model(dense, calib_ids, [24, 24, 24], batch_size=1)
    four = slice_model(dense, calib_ids, [24, 24, 24], batch_size=4)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    assert max_logit_diff(one, four, ids) <= 1e-4


def test_more_width_keeps_the_model_closer_to_dense(calib_ids):
    """On the calibration windows themselves the sliced-off energy shrinks as the width grows."""
    dense = llama_with_scaled_norms()
    errors = [
        max_logit_diff(dense, slice_model(dense, calib_ids, [w] * 3, batch_size=4), calib_ids) for w in (8, 16, 24, 32)
    ]
    assert errors[-1] <= ROTATION_TOLERANCE and errors[0] > errors[-1]


def test_generation_with_the_kv_cache_matches_recomputing(calib_ids):
    sliced = slice_model(llama_with_scaled_norms(), calib_ids, [24, 16, 20], batch_size=4)
    prompt = torch.tensor([[5, 17, 3, 99]])
    cached = sliced.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    recomputed = sliced.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    # tokens, not logits, compared exactly: the two paths round differently (~1e-7 on these logits), but the smallest
    # top-two gap of a generated step here is 3e-3, so no CPU's rounding can change an argmax
    assert torch.equal(cached, recomputed) and cached.shape[1] == 10


def test_families_that_cannot_be_sliced_exactly_are_refused_with_the_reason(calib_ids):
    with pytest.raises(DlpError, match="model_type 'gemma2' cannot be sliced exactly: .*post_feedforward_layernorm"):
        slice_model(tiny_model("gemma2"), calib_ids, [24, 24, 24])
    with pytest.raises(DlpError, match="model_type 'opt' cannot be sliced exactly: its blocks use LayerNorm"):
        slice_model(tiny_model("opt"), calib_ids, [24, 24, 24])


# --- scripts


def test_slice_script_rejects_bad_values_with_one_line(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, slicing=1.2)
    result = run([sys.executable, str(REPO / "train" / "slice.py"), "--config", str(recipe)])
    assert result.returncode == 2 and result.stderr.strip() == "error: slicing must be in [0, 1) (got 1.2)"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, slicing_allocation="owl")
    result = run([sys.executable, str(REPO / "train" / "slice.py"), "--config", str(recipe)])
    assert result.returncode == 2 and "slicing_allocation must be one of uniform, lr (got 'owl')" in result.stderr


def run_sliced_pipeline(out: Path, model_dir: Path, **overrides) -> Path:
    """``train/prune_lora.py`` with ``method: slice`` on a tiny model; the finished run directory."""
    recipe = write_recipe(out / "recipe.yaml", model_dir, method="slice", slicing=0.25, slicing_multiple=1, **overrides)
    result = run(
        [
            sys.executable,
            str(REPO / "train" / "prune_lora.py"),
            "--config",
            str(recipe),
            "--output_dir",
            str(out / "run"),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


@pytest.fixture(scope="module")
def sliced_lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sliced")
    return run_sliced_pipeline(out, tiny_model_dir, slicing_allocation="lr", slicing_spread=0.1, max_steps=30)


def test_slice_then_lora_pipeline_exports_a_smaller_model_that_reloads(sliced_lora_run):
    run_dir = sliced_lora_run
    for name in (
        "slice/model/modeling_sliced.py",
        "slice/report.json",
        "slice/widths.png",
        "adapter/adapter_config.json",
        "model/modeling_sliced.py",
        "model/README.md",
        "report.json",
        "summary.md",
        "widths.png",
        "loss.png",
    ):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "model" / "masks.safetensors").exists()
    report = json.loads((run_dir / "report.json").read_text())
    slicing = report["slicing"]
    assert report["method"] == "slice" and set(report["perplexity"]) == {"dense", "sliced", "finetuned"}
    assert slicing["mean_fraction"] == pytest.approx(0.25, abs=0.01) and len(set(slicing["widths"])) > 1
    assert slicing["parameters"]["ratio_without_embeddings"] < 1.0
    assert report["merge"]["max_logit_diff"] <= 1e-4
    assert report["perplexity"]["finetuned"]["value"] < report["perplexity"]["sliced"]["value"]
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert "trust_remote_code=True" in (run_dir / "model" / "README.md").read_text()


def test_method_slice_refuses_a_4bit_base(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, method="slice", load_in_4bit=True)
    result = run(
        [
            sys.executable,
            str(REPO / "train" / "prune_lora.py"),
            "--config",
            str(recipe),
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    assert result.returncode == 2 and "load_in_4bit is supported with method prune only" in result.stderr


@pytest.mark.real_model
@requires_demo_model
def test_smollm2_rotation_without_slicing_keeps_its_logits():
    from dlp.data import load_calibration
    from dlp.modeling import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    calib = load_calibration(tokenizer, "builtin:wikitext2-valid", 4, 128, 0, "train")
    rotated = slice_model(
        model, calib.input_ids, [model.config.hidden_size] * model.config.num_hidden_layers, batch_size=4
    )
    ids = calib.input_ids[:2, :64]
    diff = max_logit_diff(model, rotated, ids)
    with torch.no_grad():  # for scale: the dense model against itself, one window alone vs in a batch of two
        floor = float((model(input_ids=ids[:1]).logits - model(input_ids=ids).logits[:1]).abs().max())
        scale = float(model(input_ids=ids).logits.abs().max())
    print(
        f"SmolLM2 rotated, unsliced: max |logit difference| {diff:.3g} (logits up to {scale:.1f}; "
        f"dense batch-1 vs batch-2: {floor:.3g})"
    )  # shown with pytest -s
    assert diff <= 1e-3, diff  # 30 blocks of fp32 rounding on logits of magnitude ~20
