"""The prune → finetune → merge → export → evaluate pipeline, end to end on a tiny model, through its CLI.

One uninterrupted single-process run (module fixture) is the reference; a killed-and-resumed run of the same
recipe is compared with it (multi-process runs: tests/test_distributed.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from dlp.masks import MaskSet

SCRIPT = REPO / "train" / "prune_lora.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def write_recipe(path: Path, model_dir: Path, **overrides) -> Path:
    fields = {
        "model_name_or_path": str(model_dir),
        "dtype": "float32",
        "calibration_data": "builtin:wikitext2-valid",
        "nsamples": 4,
        "seqlen": 32,
        "sparsity": 0.7,
        "allocation": "dlp",
        "criterion": "wanda",
        "eval_seqlen": 32,
        "eval_max_windows": 4,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "train_max_windows": 256,
        "max_length": 64,
        "per_device_train_batch_size": 4,
        "max_steps": 60,
        "save_steps": 5,
        "logging_steps": 5,
        "learning_rate": 0.002,
        "bf16": False,
        "activation_checkpointing": False,
        "report_to": "none",
        "seed": 0,
        "disable_tqdm": True,
    }
    fields.update(overrides)
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in fields.items()))
    return path


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600, **kwargs)


def kill_when(args: list[str], marker: Path, timeout: float = 300) -> None:
    """Start ``args`` and kill it with SIGKILL (no clean-up of any kind) as soon as ``marker`` exists."""
    proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def merged_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_compressed_copy_is_the_model(run_dir: Path) -> None:
    """``model-sparse/`` (export_sparse, the default) decompresses bitwise into ``model/``."""
    from dlp.compressed import load_compressed

    reloaded = load_compressed(run_dir / "model-sparse", "dense").state_dict()
    dense = merged_weights(run_dir)
    assert all(torch.equal(reloaded[key], dense[key]) for key in dense), run_dir


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(out / "recipe.yaml", tiny_model_dir)
    result = run([sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(out / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


def test_pipeline_writes_every_artifact_and_a_consistent_report(reference_run):
    for name in (
        "prune/masks.safetensors",
        "adapter/adapter_config.json",
        "adapter/training_log.json",
        "model/model.safetensors",
        "model/config.json",
        "model/README.md",
        "model/masks.safetensors",
        "model-sparse/model.safetensors",  # export_sparse (the default): mask bits + kept values
        "model-sparse/modeling_compressed.py",
        "model-sparse/sparse_kernel.py",
        "report.json",
        "summary.md",
        "sparsity.png",
        "loss.png",
        "eval.json",
        "merge.json",
    ):
        assert (reference_run / name).is_file(), name
    report = json.loads((reference_run / "report.json").read_text())
    assert set(report["perplexity"]) == {"dense", "pruned", "finetuned"}
    assert report["merge"]["violations"] == 0 and report["export"]["reloaded_violations"] == 0
    assert report["merge"]["max_logit_diff"] <= 1e-4
    assert report["training"]["global_steps"] == 60 and report["training"]["tokens_seen"] == 60 * 4 * 64
    assert abs(report["sparsity"]["overall"] - 0.7) < 0.01
    losses = [e["loss"] for e in report["log_history"] if "loss" in e]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert report["perplexity"]["finetuned"]["value"] < report["perplexity"]["pruned"]["value"]
    card = (reference_run / "model" / "README.md").read_text()
    assert "mask-exact LoRA" in card and f"{report['perplexity']['finetuned']['value']:.2f}" in card
    pipeline_parts = ["train_load_s", "train_s", "save_adapter_s", "merge_s", "export_s", "eval_finetuned_s"]
    assert list(report["timings"])[-6:] == pipeline_parts and "prune_s" in report["timings"]
    assert all(seconds > 0 for seconds in report["timings"].values())
    assert report["peak_memory"]["host_mib"] > 100 and "- wall time: load " in card


def test_export_obeys_the_masks_and_reloads_without_dlp(reference_run):
    masks = MaskSet.load(reference_run / "model" / "masks.safetensors")
    assert masks.digest() == MaskSet.load(reference_run / "prune" / "masks.safetensors").digest()
    weights = merged_weights(reference_run)
    for name, keep in masks.masks.items():
        assert (weights[f"{name}.weight"][~keep] == 0).all(), name
    probe = reference_run / "probe.pt"
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM as M; "
        f"m = M.from_pretrained({str(reference_run / 'model')!r}).eval(); "
        "ids = torch.arange(40).view(2, 20) % m.config.vocab_size; "
        f"torch.save(m(input_ids=ids).logits, {str(probe)!r}); "
        "assert not any(k == 'dlp' or k.startswith('dlp.') for k in sys.modules)"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    # the same logits from the adapter model built by dlp (the merge is exact)
    from dlp.merge import load_adapter_model

    # the compressed export decompresses, without dlp, into the same weights
    code = (
        "import sys; sys.modules['dlp'] = None; import torch; from transformers import AutoModelForCausalLM as M; "
        f"c = M.from_pretrained({str(reference_run / 'model-sparse')!r}, trust_remote_code=True, "
        "compressed_mode='dense'); "
        f"d = M.from_pretrained({str(reference_run / 'model')!r}); "
        "a, b = c.state_dict(), d.state_dict(); assert a.keys() == b.keys(); "
        "assert all(torch.equal(a[k], b[k]) for k in a)"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    model, _ = load_adapter_model(reference_run / "prune" / "model", reference_run / "adapter", masks)
    with torch.no_grad():
        adapter_logits = model.eval()(input_ids=torch.arange(40).view(2, 20) % 128).logits
    assert (torch.load(probe) - adapter_logits).abs().max() <= 1e-4


def test_rerun_of_a_finished_run_returns_at_once(reference_run):
    recipe = reference_run.parent / "recipe.yaml"
    result = run([sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(reference_run)])
    assert result.returncode == 0 and "already holds a finished run" in result.stdout


def test_standalone_merge_script_reproduces_the_export(reference_run, tmp_path):
    result = run(
        [
            sys.executable,
            str(REPO / "train" / "merge.py"),
            "--base_dir",
            str(reference_run / "prune" / "model"),
            "--adapter_dir",
            str(reference_run / "adapter"),
            "--output_dir",
            str(tmp_path / "merged"),
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0 nonzero pruned weights" in result.stdout
    ours, theirs = load_file(str(tmp_path / "merged" / "model.safetensors")), merged_weights(reference_run)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    compressed = "model-sparse/model.safetensors"
    assert (tmp_path / "merged-sparse" / "model.safetensors").read_bytes() == (reference_run / compressed).read_bytes()


def test_reusing_the_prune_stage_trains_the_same_adapter_bit_for_bit(reference_run, tmp_path):
    """Same recipe, same bytes, whether the pipeline pruned or was handed a finished prune run: the adapter's
    random initialisation is seeded from the recipe where it is drawn. Before, a reused stage skipped the only
    seeding, and a fresh process's torch generator starts from a random seed, so two identical runs differed."""
    recipe = reference_run.parent / "recipe.yaml"
    out = tmp_path / "reused"
    args = [sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(out)]
    result = run([*args, "--prune_dir", str(reference_run / "prune")])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        assert (out / name).read_bytes() == (reference_run / name).read_bytes(), name


def test_killed_during_finetuning_resumes_to_the_same_model(reference_run, tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir)
    out = tmp_path / "run"
    args = [sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(out)]
    kill_when(args, out / "finetune" / "checkpoint-5" / "trainer_state.json")
    assert (out / "finetune" / "checkpoint-5").is_dir() and not (out / "adapter").exists(), "not killed while training"
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming fine-tuning from" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["resumed_from"] and report["training"]["global_steps"] == 60
    reference = json.loads((reference_run / "report.json").read_text())
    assert report["masks_digest"] == reference["masks_digest"]
    ours, theirs = merged_weights(out), merged_weights(reference_run)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4)


def test_resuming_with_another_recipe_is_refused(reference_run, tmp_path):
    """A partial run of one recipe must not be finished with another's settings (stale masks or adapter)."""
    import shutil

    partial = tmp_path / "partial"  # a run that got as far as its prune stage
    partial.mkdir()
    for name in (".dlp", "recipe.json"):
        shutil.copy(reference_run / name, partial / name)
    shutil.copytree(reference_run / "prune", partial / "prune")
    recipe = reference_run.parent / "recipe.yaml"
    result = run(
        [sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(partial), "--learning_rate", "0.005"]
    )
    assert result.returncode == 2 and "holds a run of another recipe (learning_rate: 0.002 → 0.005)" in result.stderr
    assert sorted(p.name for p in partial.iterdir()) == [".dlp", "prune", "recipe.json"]


@pytest.mark.parametrize(
    "override, message",
    [
        (["--lora_dropout", "1.5"], "lora_dropout must be in [0, 1)"),
        (["--use_dora", "true"], "use_dora must be false"),
        (["--train_data", "builtin:wikitext2-test"], "train_data must not be the evaluation text"),
        (["--allocation", "greedy"], "allocation must be one of"),
        (["--load_in_8bit", "true"], "load_in_8bit is not supported"),
        (["--merge_base", "dequantized"], "merge_base dequantized needs load_in_4bit: true"),
        (["--merge_base", "both"], "merge_base must be one of full, dequantized (got 'both')"),
        (
            ["--load_in_4bit", "true", "--bnb_4bit_quant_type", "int4"],
            "invalid choice: 'int4' (choose from 'fp4', 'nf4')",
        ),
        (
            ["--export_dense", "false", "--export_sparse", "false"],
            "export_dense and export_sparse are both false: set one of them true",
        ),
        (["--export_values", "int3"], "export_values must be one of model, int8, int4, nf4 (got 'int3')"),
        (["--export_values", "nf4", "--export_group_size", "0"], "export_group_size must be one of 32,"),
        (["--export_dense", "false", "--export_4bit", "true"], "export_4bit re-quantizes the dense export"),
    ],
)
def test_bad_recipe_values_exit_2_with_one_line(tiny_model_dir, tmp_path, override, message):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir)
    result = run([sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(tmp_path / "x"), *override])
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x" / "report.json").exists()


def test_a_compressed_only_export_with_nf4_values_is_evaluated_through_its_remote_code(
    reference_run, tiny_model_dir, tmp_path
):
    """export_dense false: model/ is the sparse checkpoint (NF4 values), reloaded without dlp for the
    evaluation; the prune stage and adapter of the reference run are reused, so only merge, export and evaluation
    run."""
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, export_dense=False, export_values="nf4")
    out = tmp_path / "run"
    out.mkdir()
    result = run(
        [
            sys.executable,
            str(SCRIPT),
            "--config",
            str(recipe),
            "--output_dir",
            str(out),
            "--prune_dir",
            str(reference_run / "prune"),
            "--max_steps",
            "5",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model/ (merged, mask bits + kept values, trust_remote_code=True)" in result.stdout
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["model_type"] == "dlp_compressed" and config["dlp_compressed"]["values"] == "nf4"
    assert not (out / "model-sparse").exists() and (out / "model" / "README.md").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["reloaded_violations"] == 0 and report["perplexity"]["finetuned"]["value"] > 1


def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    from dlp.finetune import last_checkpoint

    assert last_checkpoint(tmp_path / "missing") is None
    for step, state in ((5, "{}"), (10, '{"global_step": 10}'), (15, None), (20, '{"glob')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-latest").mkdir()
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
