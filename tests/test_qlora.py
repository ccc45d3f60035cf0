"""Mask-exact LoRA on a 4-bit (bitsandbytes NF4) base: forward, training, both merges, the 4-bit export, and the
QLoRA pipeline end to end on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from dlp.errors import DlpError
from dlp.lora import attach_masks, masked_lora_layers
from dlp.masks import MaskSet
from dlp.export import export_quantized
from dlp.merge import MERGE_TOLERANCE, QUANTIZATION_FILE, load_adapter_model, merge_masked
from dlp.projections import dense_weight, is_quantized
from test_lora import random_masks, train_steps
from test_prune_lora import ENV, SCRIPT, assert_compressed_copy_is_the_model, merged_weights, write_recipe

pytest.importorskip("bitsandbytes")


def nf4_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


@pytest.fixture
def pruned_base(tiny_model_dir, tmp_path):
    """The tiny Llama of ``tiny_model_dir`` with random masks applied, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    masks = random_masks(model)
    masks.apply(model)
    model.save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "base")
    return tmp_path / "base", masks


def qlora_model(base_dir, masks):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    quantized = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=nf4_config(), dtype=torch.float32)
    peft_model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert attach_masks(peft_model, masks) == len(masks.masks)
    return peft_model


def test_forward_uses_the_dequantized_base_plus_the_masked_delta(pruned_base):
    base_dir, masks = pruned_base
    peft_model = qlora_model(base_dir, masks)
    name, layer = next(iter(masked_lora_layers(peft_model).items()))
    assert is_quantized(layer.get_base_layer().weight)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        x = torch.randn(3, masks.masks[name].shape[1])
        W = dense_weight(layer.get_base_layer().weight, torch.float32)
        assert (W[~masks.masks[name]] == 0).all()  # NF4 keeps the pruned zeros exact
        delta = layer.get_delta_weight("default")
        assert (delta[~masks.masks[name]] == 0).all()
        torch.testing.assert_close(layer(x), x @ (W + delta).T)


def test_qlora_trains_and_both_merges_keep_zeros(pruned_base, tmp_path):
    base_dir, masks = pruned_base
    peft_model = qlora_model(base_dir, masks)
    train_steps(peft_model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        trained_logits = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / QUANTIZATION_FILE).write_text(nf4_config().to_json_string())

    merged = {}
    for merge_base in ("full", "dequantized"):
        model, _ = load_adapter_model(base_dir, tmp_path / "adapter", masks, merge_base=merge_base)
        merged[merge_base], check = merge_masked(model, masks, ids)
        assert check.violations == 0 and masks.violations(merged[merge_base]) == 0
        assert not any(is_quantized(getattr(m, "weight", None)) for m in merged[merge_base].modules())
    with torch.no_grad():
        exact = merged["dequantized"](input_ids=ids).logits
        full = merged["full"](input_ids=ids).logits
    # merging into the dequantized base reproduces the model that was trained; the full-precision base differs
    assert (exact - trained_logits).abs().max() <= MERGE_TOLERANCE
    assert (full - trained_logits).abs().max() > MERGE_TOLERANCE

    (tmp_path / "adapter" / QUANTIZATION_FILE).unlink()
    with pytest.raises(DlpError, match="merge_base: dequantized needs an adapter trained on a 4-bit base"):
        load_adapter_model(base_dir, tmp_path / "adapter", masks, merge_base="dequantized")

    from transformers import AutoTokenizer

    merged["full"].save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp_path / "merged")
    assert export_quantized(tmp_path / "merged", tmp_path / "merged-4bit", masks, nf4_config()) == 0
    assert MaskSet.load(tmp_path / "merged-4bit" / "masks.safetensors").digest() == masks.digest()


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora")
    recipe = write_recipe(
        out / "recipe.yaml",
        tiny_model_dir,
        max_steps=10,
        load_in_4bit=True,
        use_bnb_nested_quant=True,
        export_4bit=True,
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(out / "run")],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


def test_qlora_pipeline_exports_exact_zeros_in_16_and_4_bit(qlora_run):
    report = json.loads((qlora_run / "report.json").read_text())
    assert {"dense", "pruned", "pruned_4bit", "finetuned", "finetuned_4bit"} <= set(report["perplexity"])
    assert report["quantization"]["bnb_4bit_quant_type"] == "nf4" and report["merge"]["merge_base"] == "full"
    assert report["export"] == {"reloaded_violations": 0, "reloaded_violations_4bit": 0}
    masks = MaskSet.load(qlora_run / "model" / "masks.safetensors")
    weights = merged_weights(qlora_run)
    assert all((weights[f"{n}.weight"][~k] == 0).all() for n, k in masks.masks.items())
    assert json.loads((qlora_run / "adapter" / QUANTIZATION_FILE).read_text())["bnb_4bit_use_double_quant"] is True
    assert "4-bit NF4 (the QLoRA base)" in (qlora_run / "model" / "README.md").read_text()
    config = json.loads((qlora_run / "model-4bit" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert_compressed_copy_is_the_model(qlora_run)  # the compressed export after a 4-bit run


def test_merge_script_dequantized_mode_reproduces_the_trained_model(qlora_run, tmp_path):
    merge = [
        sys.executable,
        str(REPO / "train" / "merge.py"),
        "--base_dir",
        str(qlora_run / "prune" / "model"),
        "--adapter_dir",
        str(qlora_run / "adapter"),
        "--merge_base",
        "dequantized",
        "--output_dir",
        str(tmp_path / "merged"),
    ]
    result = subprocess.run(merge, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0 nonzero pruned weights" in result.stdout
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    masks = MaskSet.load(qlora_run / "prune" / "masks.safetensors")
    quantized = AutoModelForCausalLM.from_pretrained(
        qlora_run / "prune" / "model", quantization_config=nf4_config(), dtype=torch.float32
    )
    trained = PeftModel.from_pretrained(quantized, str(qlora_run / "adapter"))
    attach_masks(trained, masks)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert masks.violations(merged) == 0
    ids = torch.arange(48).view(2, 24) % 90
    with torch.no_grad():
        gap = (merged(input_ids=ids).logits - trained.eval()(input_ids=ids).logits).abs().max()
    assert gap <= MERGE_TOLERANCE


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"load_in_4bit": True, "bnb_4bit_quant_type": "int4"},
            "bnb_4bit_quant_type must be one of nf4, fp4 (got 'int4')",
        ),
        (
            {"load_in_4bit": True, "dtype": "int8"},
            "dtype (the 4-bit compute dtype) must be one of float32, bfloat16, float16",
        ),
        ({"load_in_8bit": True}, "load_in_8bit is not supported"),
    ],
)
def test_quantization_fields_from_a_recipe_are_checked(fields, message):
    """Values from a YAML recipe bypass argparse's choices, so dlp checks them itself."""
    from types import SimpleNamespace

    from dlp.quantize import bnb_config

    args = SimpleNamespace(
        **{
            "load_in_4bit": False,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "use_bnb_nested_quant": False,
            "dtype": "float32",
            **fields,
        }
    )
    with pytest.raises(DlpError, match=message.replace("(", r"\(").replace(")", r"\)")):
        bnb_config(args)
    assert bnb_config(SimpleNamespace(**{**vars(args), **{"load_in_4bit": False, "load_in_8bit": False}})) is None


def _quantized_linear(out_features: int, in_features: int):
    """A bitsandbytes NF4 Linear with every third input column zero (pruned), quantized on the CPU."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) / in_features**0.5
    weight[:, ::3] = 0
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")._quantize("cpu")
    return layer, weight


def test_dense_weight_reads_a_weight_bitsandbytes_repacked_for_the_cpu_kernel():
    """Forces bitsandbytes' AVX512-BF16 repacking on every machine (the repacking itself is plain torch) and checks
    that dlp reads the same weight from both layouts: zeros exactly, values up to the bfloat16 scales it keeps."""
    import copy

    import bitsandbytes.functional as bnb_functional

    layer, _ = _quantized_linear(64, 128)
    canonical = dense_weight(layer.weight)
    packed_data, packed_state = bnb_functional._convert_weight_packed_for_cpu(
        layer.weight.data.clone(), copy.copy(layer.weight.quant_state)
    )
    layer.weight.data, layer.weight.quant_state = packed_data, packed_state
    assert layer.weight.quant_state.packing_format_for_cpu
    repacked = dense_weight(layer.weight)
    assert repacked.shape == canonical.shape == (64, 128)
    assert torch.equal(repacked == 0, canonical == 0)
    assert float((repacked - canonical).abs().max()) <= 4e-3 * float(canonical.abs().max())  # bf16 absmax
    assert layer.weight.quant_state.packing_format_for_cpu  # reading it did not convert the parameter back


def test_dlp_keeps_4bit_weights_out_of_the_cpu_repacking_on_every_cpu(pruned_base, monkeypatch):
    """As if this CPU had AVX512-BF16: bitsandbytes would repack the tiny model's weights at the first eval forward
    and fail on their shapes (input width 32 < block size 64). dlp's loader switches that path off."""
    import bitsandbytes.nn.modules as bnb_modules
    from transformers import AutoModelForCausalLM

    from dlp.modeling import load_model_and_tokenizer

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    base_dir, masks = pruned_base
    plain = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=nf4_config(), dtype=torch.float32).eval()
    with torch.no_grad(), pytest.raises(RuntimeError):  # what happens without dlp, whatever the CPU
        plain(input_ids=torch.tensor([[1, 2, 3]]))
    model, _ = load_model_and_tokenizer(str(base_dir), "float32", "sdpa", quantization_config=nf4_config())
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert masks.violations(model) == 0
