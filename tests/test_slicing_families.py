"""Dynamic Slicing beyond Llama: Mistral (sliding window), Qwen2 (q/k/v biases, sliding layers), Qwen3 (per-head
q/k norms), Phi-3 (fused qkv and gate/up projections) and Gemma ((1 + w) norms, scaled embeddings), each through one
sliced block built from the family's own attention and MLP. On tiny random configs of each family: the rotation
alone changes nothing, KV-cache generation equals recomputation, the export reloads without dlp, and a LoRA merge
is exact; Phi-3 also runs the slice → LoRA → merge → export pipeline end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import save_tiny_model, tiny_config, tiny_tokenizer
from dlp.errors import DlpError
from dlp.export import export_model
from dlp.slicing import check_sliceable_type, norm_scale, slice_model
from dlp.stages.slice_stage import SliceMethod
from test_prune_lora import ENV
from test_slicing import run_sliced_pipeline

ROTATION_TOLERANCE = 1e-4  # fp32 max |logit difference| of a rotated, unsliced model
WINDOWED = {  # a window shorter than the probes, so sliding-window layers really differ from full attention
    "mistral": dict(sliding_window=16),
    "qwen2": dict(use_sliding_window=True, sliding_window=16, max_window_layers=1),
}
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma"]


def family_model(family: str, seed: int = 0, windowed: bool = True) -> nn.Module:
    """A tiny random ``family`` model whose norm scales, biases and q/k norms are not their defaults, so folding,
    biases and copying are all exercised (``windowed``: with the short sliding window of ``WINDOWED``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family)
    if windowed:
        for key, value in WINDOWED.get(family, {}).items():
            setattr(config, key, value)
        if family == "qwen2":
            config.layer_types = ["full_attention"] + ["sliding_attention"] * (config.num_hidden_layers - 1)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # Gemma's scale is 1 + w: w around 0 there, around 1 elsewhere
                param.copy_((0.0 if family == "gemma" else 1.0) + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def max_logit_diff(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


PROBE = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_without_slicing_reproduces_the_dense_logits(family, calib_ids):
    dense = family_model(family)
    rotated = slice_model(dense, calib_ids, [32, 32, 32], batch_size=2)
    assert type(rotated).__name__ == f"Sliced{type(dense).__name__}"
    assert max_logit_diff(dense, rotated, PROBE) <= ROTATION_TOLERANCE
    if family in WINDOWED:  # the window matters on these probes: full attention would give other logits
        assert max_logit_diff(dense, family_model(family, windowed=False), PROBE) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_generation_with_the_kv_cache_equals_the_full_forward(family, calib_ids):
    sliced = slice_model(family_model(family), calib_ids, [24, 16, 20], batch_size=4)
    prompt = PROBE[:1, :20]  # longer than Mistral's and Qwen2's window once generation runs
    mask = torch.ones_like(prompt)  # explicit: generate would otherwise infer it from a pad id the prompt may hold
    out = sliced.generate(
        prompt, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True,
        output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    with torch.no_grad():  # one forward over the whole generated sequence, no cache
        full = sliced(input_ids=out.sequences).logits[:, 19:-1]
    assert out.sequences.shape[1] == 28
    # the logits each cached step chose from, not the argmax tokens: the cached step and the full forward run other
    # attention shapes, so float32 rounding differs (≤ 2e-7 measured on logits ≤ 0.6), and Phi-3 here has a top-two
    # gap of 5e-6 where a token comparison would hang on the CPU's last bits. 1e-5 is 50× that rounding; a cache bug
    # (a wrong position, window or rotation) moves them far more: the window alone moves them by > 1e-3 (above).
    torch.testing.assert_close(torch.stack(out.logits, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sliced_export_reloads_without_dlp(family, calib_ids, tmp_path):
    sliced = slice_model(family_model(family), calib_ids, [24, 16, 20], batch_size=4)
    target = export_model(sliced, tiny_tokenizer(), None, tmp_path / "sliced")
    config = json.loads((target / "config.json").read_text())
    assert config["model_type"] == f"sliced_{family}" and (target / "modeling_sliced.py").is_file()
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_sliced.{type(sliced).__name__}"
    probe = tmp_path / "logits.pt"
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM as M; "
        f"m = M.from_pretrained({str(target)!r}, trust_remote_code=True).eval(); "
        f"torch.save(m(input_ids=torch.tensor({PROBE.tolist()})).logits, {str(probe)!r}); "
        "assert not any(k == 'dlp' or k.startswith('dlp.') for k in sys.modules), 'dlp was imported'"
    )
    # bit for bit: the exported module is dlp's own modeling_sliced.py and the weights are stored exactly, so both
    # processes run the same kernels on the same data; the child gets this process's thread count, so nothing that
    # could pick another kernel differs
    env = {**ENV, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        expected = sliced(input_ids=PROBE).logits
    assert torch.equal(torch.load(probe), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_a_sliced_model_merges_exactly(family, calib_ids):
    from peft import LoraConfig, get_peft_model

    sliced = slice_model(family_model(family), calib_ids, [24, 16, 20], batch_size=4)
    targets = SliceMethod().lora_targets(sliced)
    assert not {"input_proj", "attn_shortcut", "mlp_shortcut"} & set(targets)
    torch.manual_seed(0)
    lora = get_peft_model(sliced, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        adapted = lora(input_ids=PROBE).logits
        merged = lora.merge_and_unload()(input_ids=PROBE).logits
    assert float((adapted - merged).abs().max()) <= 1e-4 * max(1.0, float(adapted.abs().max()))


def test_fused_projections_and_per_head_norms_are_handled_as_found(calib_ids):
    phi3 = slice_model(family_model("phi3"), calib_ids, [24, 16, 20], batch_size=4).model.layers[1]
    assert phi3.self_attn.qkv_proj.weight.shape == (32 + 2 * 16, 16) and phi3.self_attn.o_proj.weight.shape[0] == 16
    assert phi3.mlp.gate_up_proj.weight.shape == (2 * 64, 16) and phi3.mlp.down_proj.weight.shape == (20, 64)
    dense = family_model("qwen3")
    qwen3 = slice_model(dense, calib_ids, [24, 16, 20], batch_size=4).model.layers[2].self_attn
    assert torch.equal(qwen3.q_norm.weight, dense.model.layers[2].self_attn.q_norm.weight)  # copied, not rotated


def test_norm_scale_is_found_by_what_reproduces_the_module():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    llama, gemma = LlamaRMSNorm(4), GemmaRMSNorm(4)
    with torch.no_grad():
        llama.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
        gemma.weight.copy_(torch.tensor([0.5, 1.0, 2.0, -1.0]))
    assert torch.equal(norm_scale(llama), torch.tensor([0.5, 1.0, 2.0, -1.0]))
    assert torch.equal(norm_scale(gemma), torch.tensor([1.5, 2.0, 3.0, 0.0]))  # Gemma scales by 1 + w
    with pytest.raises(DlpError, match="not an RMS norm with a per-channel scale"):
        norm_scale(nn.LayerNorm(4))


@pytest.mark.parametrize(
    "model_type, reason",
    [
        ("gemma2", "post_feedforward_layernorm"),
        ("gpt_neox", "LayerNorm .* in parallel"),
        ("bert", "slicing supports model_type llama, mistral, qwen2, qwen3, phi3, gemma; got 'bert'"),
    ],
)
def test_unsliceable_types_are_refused_from_the_config_alone(model_type, reason):
    with pytest.raises(DlpError, match=reason):
        check_sliceable_type(model_type)


@pytest.fixture(scope="module")
def phi3_sliced_lora_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phi3")
    return run_sliced_pipeline(out, save_tiny_model(out / "phi3-tiny", "phi3"), max_steps=20)


def test_phi3_slice_then_lora_pipeline_exports_a_model_that_reloads(phi3_sliced_lora_run):
    report = json.loads((phi3_sliced_lora_run / "report.json").read_text())
    assert report["method"] == "slice" and report["slicing"]["mean_fraction"] == pytest.approx(0.25, abs=0.01)
    assert report["merge"]["max_logit_diff"] <= 1e-4 and report["slicing"]["parameters"]["ratio"] < 1.0
    config = json.loads((phi3_sliced_lora_run / "model" / "config.json").read_text())
    assert config["model_type"] == "sliced_phi3"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_sliced.SlicedPhi3ForCausalLM"
    adapter = json.loads((phi3_sliced_lora_run / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert report["perplexity"]["finetuned"]["value"] < report["perplexity"]["sliced"]["value"]
