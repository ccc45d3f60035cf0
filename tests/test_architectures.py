"""Breadth over architectures: every supported decoder family through the real pipeline (train/prune_lora.py:
prune with DLP allocation and Wanda at 70% → 3 steps of mask-exact LoRA with SFTTrainer → merge with a logit
probe → export), then the export reloaded with plain ``transformers`` and checked against its masks. GPT-2 runs
twice: also as QLoRA (its Conv1D layers become ``Linear4bit`` [out, in] for training, merged into the
dequantized base, which must be GPT-2's own Conv1D model again), where bitsandbytes is installed.

One subprocess runs the pipeline for every case in turn (a subprocess costs ~8 s to start; one per family would
cost more than the runs). The driver records each case's outcome, so a failing family fails only its own test.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ALL_FAMILIES, REPO, save_tiny_model, tiny_model
from test_prune_lora import ENV, SCRIPT, write_recipe

LAYERS = 3
# prunable projections per decoder layer, counted from each family's modeling code (not from dlp's detection)
PROJECTIONS_PER_LAYER = {
    "llama": 7,
    "mistral": 7,
    "qwen2": 7,
    "qwen3": 7,
    "gemma": 7,
    "gemma2": 7,
    "phi3": 4,  # fused qkv_proj, o_proj, fused gate_up_proj, down_proj
    "opt": 6,  # q/k/v/out_proj, fc1, fc2
    "gpt_neox": 4,  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    "gpt2": 4,
}  # Conv1D c_attn, attn.c_proj, c_fc, mlp.c_proj
RECIPE = dict(
    nsamples=4,
    seqlen=32,
    sparsity=0.7,
    allocation="dlp",
    criterion="wanda",
    eval_seqlen=32,
    eval_max_windows=2,
    train_max_windows=16,
    max_length=32,
    per_device_train_batch_size=2,
    max_steps=3,
    save_steps=100,
    logging_steps=1,
)
QLORA = dict(load_in_4bit=True, merge_base="dequantized", export_4bit=True)
# case -> (family, recipe overrides)
CASES = {family: (family, {}) for family in ALL_FAMILIES}
if importlib.util.find_spec("bitsandbytes") is not None:
    CASES["gpt2-qlora"] = ("gpt2", QLORA)
# Excerpts of the built-in texts: the character-level tiny tokenizer takes ~1.5 s per whole WikiText-2 split, six
# times per run, which was most of the matrix's time; a few thousand characters cover every window it needs.
TEXT_CHARS = {"builtin:wikitext2-valid": 20_000, "builtin:wikitext2-test": 4_000}

DRIVER = """
import json, runpy, sys, traceback
main = runpy.run_path(sys.argv[1])["main"]
results = {}
for case, recipe, out in json.loads(sys.argv[2]):
    try:
        main(["--config", recipe, "--output_dir", out])
        results[case] = "ok"
    except BaseException as exc:  # SystemExit and DlpError included: recorded, the next case still runs
        results[case] = "".join(traceback.format_exception(exc))[-3000:]
    with open(sys.argv[3], "w") as handle:
        json.dump(results, handle)
"""


def _text_sources(root: Path) -> dict[str, str]:
    from dlp.data import read_text

    paths = {}
    for source, chars in TEXT_CHARS.items():
        paths[source] = root / f"{source.split(':')[1]}.txt"
        paths[source].write_text(read_text(source)[:chars])
    valid, test = str(paths["builtin:wikitext2-valid"]), str(paths["builtin:wikitext2-test"])
    return dict(calibration_data=valid, train_data=valid, eval_data=test)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Run the pipeline once per case (all in one subprocess); map each case to (run directory, outcome)."""
    root = tmp_path_factory.mktemp("architectures")
    data = _text_sources(root)
    jobs, runs = [], {}
    for case, (family, overrides) in CASES.items():
        model_dir = root / f"{family}-model"
        if not model_dir.is_dir():
            save_tiny_model(model_dir, family, layers=LAYERS)
        recipe = write_recipe(root / f"{case}.yaml", model_dir, **RECIPE, **data, **overrides)
        runs[case] = root / f"{case}-run"
        jobs.append((case, str(recipe), str(runs[case])))
    status_file = root / "status.json"
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(SCRIPT), json.dumps(jobs), str(status_file)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    return {case: (runs[case], status.get(case, f"not run: {result.stderr[-2000:]}")) for case in CASES}


def _logical(module: torch.nn.Module) -> torch.Tensor:
    """The weight as [out, in]: GPT-2's Conv1D stores it transposed (checked here without dlp's helpers)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


@pytest.mark.parametrize("case", list(CASES))
def test_family_prunes_finetunes_merges_and_exports(matrix, case):
    from transformers import AutoModelForCausalLM

    from dlp.masks import MaskSet

    family, _ = CASES[case]
    run_dir, status = matrix[case]
    assert status == "ok", f"{case}: {status}"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training"]["global_steps"] == 3
    assert report["merge"]["violations"] == 0 and report["merge"]["max_logit_diff"] <= 1e-4
    assert set(report["export"].values()) == {0}  # reloaded_violations (and _4bit for QLoRA)

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()
    pruned = AutoModelForCausalLM.from_pretrained(run_dir / "prune" / "model", dtype=torch.float32)
    masks = MaskSet.load(run_dir / "model" / "masks.safetensors")
    assert len(masks.masks) == PROJECTIONS_PER_LAYER[family] * LAYERS, sorted(masks.masks)
    zeros = total = 0
    trained = False
    for name, keep in masks.masks.items():
        module = model.get_submodule(name)
        assert type(module) is type(pruned.get_submodule(name)), f"{case}: {name} changed class in the export"
        weight = _logical(module).detach()
        assert weight.shape == keep.shape, name
        assert (weight[~keep] == 0).all(), f"{case}: {name} has nonzero pruned weights"
        zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
        trained |= not torch.equal(weight, _logical(pruned.get_submodule(name)).detach())
    assert abs(zeros / total - 0.70) < 0.01 and abs(report["sparsity"]["overall"] - 0.70) < 0.01
    assert trained, f"{case}: the merged weights equal the pruned ones: the adapter changed nothing"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(32).view(1, 32)).logits).all()


def test_masks_cover_every_prunable_projection_of_every_family():
    """dlp's detection finds each family's decoder stack and every projection in it (Linear or Conv1D)."""
    from dlp.modeling import find_decoder_layers, prunable_linears

    for family in ALL_FAMILIES:
        model = tiny_model(family, layers=2)
        _, layers = find_decoder_layers(model)
        assert len(layers) == 2 and len(prunable_linears(model)) == 2 * PROJECTIONS_PER_LAYER[family], family


def test_a_model_class_without_sdpa_falls_back_to_eager_attention(tmp_path, capsys):
    from dlp.modeling import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(save_tiny_model(tmp_path, "gemma2", layers=1)))
    assert model.config._attn_implementation == "eager"
    assert "[dlp] sdpa attention is not supported by this model class; using eager attention" in capsys.readouterr().out
