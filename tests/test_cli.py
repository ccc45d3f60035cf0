"""End to end: ``train/prune.py`` on a tiny model writes every artifact; user mistakes exit 2 with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO
from dlp.compressed import load_compressed
from dlp.masks import MaskSet

SCRIPT = str(REPO / "train" / "prune.py")


def _run(args, cwd=REPO):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_prune_cli_end_to_end(tmp_path, tiny_args):
    out = tmp_path / "run"
    result = _run([*tiny_args, "--output_dir", str(out), "--sparsity", "0.6", "--dlp_statistic", "mean"])
    assert result.returncode == 0, result.stderr[-2000:]
    for artifact in (
        "masks.safetensors",
        "report.json",
        "summary.md",
        "sparsity.png",
        "layer_scores.json",
        "model/config.json",
        "model/model.safetensors",
        "model-sparse/model.safetensors",  # export_sparse (the default): mask bits + kept values
        "model-sparse/modeling_compressed.py",
    ):
        assert (out / artifact).is_file(), artifact
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["sparsity"] == 0.6 and report["config"]["dlp_statistic"] == "mean"  # CLI beat YAML
    assert abs(report["sparsity"]["overall"] - 0.6) < 0.01
    allocated = report["layer_sparsity"]["allocated"]
    assert len(set(round(s, 6) for s in allocated)) > 1 and abs(sum(allocated) / len(allocated) - 0.6) < 1e-6
    assert report["perplexity"]["pruned"]["windows"] == 3 and report["perplexity"]["pruned"]["seqlen"] == 64
    masks = MaskSet.load(out / "masks.safetensors")
    assert masks.digest() == report["masks_digest"]
    assert masks.metadata["seed"] == 0 and masks.metadata["calibration_sha256"] == report["calibration_sha256"]
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # plain transformers, no dlp needed
    assert masks.violations(model) == 0
    sparse = load_compressed(out / "model-sparse", "dense").state_dict()  # bitwise the dense export
    assert all(torch.equal(sparse[k], v) for k, v in model.state_dict().items())
    assert report["sparse_export"]["dir"] == "model-sparse" and report["sparse_export"]["values"] == "model"
    assert "- `model-sparse/`: mask bits + kept values (the model dtype)" in (out / "summary.md").read_text()
    assert "model/, model-sparse/" in result.stdout
    parts = ("load_s", "eval_dense_s", "score_s", "allocate_s", "prune_s", "save_s", "export_sparse_s", "eval_pruned_s")
    assert list(report["timings"]) == list(parts) and all(report["timings"][p] > 0 for p in parts)
    assert report["peak_memory"]["host_mib"] > 100 and report["peak_memory"]["device_mib"] is None  # CPU only
    assert "- wall time: load " in (out / "summary.md").read_text()
    # a rerun finds the finished report and does nothing
    again = _run([*tiny_args, "--output_dir", str(out), "--sparsity", "0.6", "--dlp_statistic", "mean"])
    assert again.returncode == 0 and "already holds a finished run" in again.stdout


def test_fast_mode_cli(tmp_path, tiny_args):
    out = tmp_path / "fast"
    result = _run([*tiny_args, "--output_dir", str(out), "--prune_mode", "fast", "--eval_dense", "false"])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert abs(report["sparsity"]["overall"] - 0.7) < 0.01 and report["config"]["prune_mode"] == "fast"


def test_same_seed_bit_identical_masks_other_seed_differs(tmp_path, tiny_args):
    digests = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        result = _run(
            [
                *tiny_args,
                "--output_dir",
                str(tmp_path / name),
                "--seed",
                seed,
                "--eval_dense",
                "false",
                "--save_model",
                "false",
            ]
        )
        assert result.returncode == 0, result.stderr[-2000:]
        digests.append(json.loads((tmp_path / name / "report.json").read_text())["masks_digest"])
    assert digests[0] == digests[1] != digests[2]


@pytest.mark.parametrize(
    "override, message",
    [
        (["--allocation", "best"], "allocation must be one of uniform, owl, dlp, lr, explicit, search (got 'best')"),
        (["--pattern", "2:4"], "pattern 2:4 fixes every layer at 50% sparsity, so allocation must be uniform"),
        (["--pattern", "2:4", "--allocation", "uniform"], "set sparsity: 0.5"),
        (["--pattern", "4-8"], "pattern must be 'unstructured' or 'N:M'"),
        (["--sparsity", "1.2"], "sparsity must be in [0, 1)"),
        (["--criterion", "obs"], "criterion must be one of magnitude, wanda, sparsegpt"),
        (["--criterion", "sparsegpt", "--prune_mode", "fast"], "prune_mode fast supports criterion magnitude, wanda"),
        (["--prune_mode", "turbo"], "prune_mode must be one of sequential, fast, onepass"),
        (["--calibration_data", "builtin:nothing"], "data source 'builtin:nothing' unknown"),
        (["--model_name_or_path", "/nonexistent/dir.gguf"], "model: GGUF file not found"),
        (["--allocation", "explicit", "--layer_sparsities", "0.5,0.6"], "layer_sparsities must list 3 values"),
        (["--export_dense", "false"], "export_dense: train/prune.py always writes the dense model/"),
        (["--export_values", "int3"], "export_values must be one of model, int8, int4, nf4 (got 'int3')"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, tiny_args, override, message):
    result = _run([*tiny_args, "--output_dir", str(tmp_path / "bad"), *override])
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bad" / "report.json").exists()


def test_export_settings_shape_the_sparse_copy_and_never_the_masks(tmp_path, tiny_args):
    """``--export_sparse false`` writes no ``model-sparse/``; int8 values write it quantized; the masks are the
    same bytes either way (export settings stay out of their metadata), and the recipe records them."""
    common = [*tiny_args, "--eval_dense", "false"]
    off = _run([*common, "--output_dir", str(tmp_path / "off"), "--export_sparse", "false"])
    int8 = _run(
        [*common, "--output_dir", str(tmp_path / "int8"), "--export_values", "int8", "--export_group_size", "32"]
    )
    assert off.returncode == 0 and int8.returncode == 0, (off.stderr + int8.stderr)[-2000:]
    assert not (tmp_path / "off" / "model-sparse").exists() and (tmp_path / "off" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "off" / "report.json").read_text())["sparse_export"] is None
    config = json.loads((tmp_path / "int8" / "model-sparse" / "config.json").read_text())["dlp_compressed"]
    assert config["values"] == "int8" and config["group_size"] == 32
    report = json.loads((tmp_path / "int8" / "report.json").read_text())
    assert report["config"]["export_values"] == "int8" and report["sparse_export"]["projection_ratio"] < 1
    masks = [(tmp_path / run / "masks.safetensors").read_bytes() for run in ("off", "int8")]
    assert masks[0] == masks[1]


def test_unknown_recipe_key_is_a_user_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("sparsity: 0.5\nsparsty_typo: 3\n")
    result = _run(["--config", str(recipe), "--output_dir", str(tmp_path / "x")])
    assert result.returncode == 2 and "sparsty_typo" in result.stderr and "Traceback" not in result.stderr


def test_masks_tool_report_verify_and_mismatch(tmp_path, tiny_args, tiny_model_dir):
    out = tmp_path / "run"
    assert _run([*tiny_args, "--output_dir", str(out), "--eval_dense", "false"]).returncode == 0
    tool = [sys.executable, str(REPO / "train" / "masks.py")]
    masks = str(out / "masks.safetensors")
    report = subprocess.run([*tool, "report", "--masks", masks], capture_output=True, text=True)
    assert report.returncode == 0 and json.loads(report.stdout)["overall"] == pytest.approx(0.7, abs=0.01)
    pruned = subprocess.run(
        [*tool, "verify", "--masks", masks, "--model", str(out / "model")], capture_output=True, text=True
    )
    assert pruned.returncode == 0 and pruned.stdout.startswith("0 masked weights")
    dense = subprocess.run(
        [*tool, "verify", "--masks", masks, "--model", str(tiny_model_dir)], capture_output=True, text=True
    )
    assert dense.returncode == 1  # the dense model does not obey the masks
    applied = tmp_path / "applied"
    assert (
        subprocess.run(
            [*tool, "apply", "--masks", masks, "--model", str(tiny_model_dir), "--output_dir", str(applied)],
            capture_output=True,
            text=True,
        ).returncode
        == 0
    )
    assert subprocess.run([*tool, "verify", "--masks", masks, "--model", str(applied)]).returncode == 0
    from conftest import tiny_model

    other = tmp_path / "other"
    tiny_model("llama", layers=2).save_pretrained(other)  # masks name 3 layers
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    mismatch = subprocess.run(
        [*tool, "verify", "--masks", masks, "--model", str(other)], capture_output=True, text=True
    )
    last_line = mismatch.stderr.strip().splitlines()[-1]
    assert mismatch.returncode == 2
    assert last_line == "error: masks: the masks were made for decoder layers 3, --model has 2"
    assert "Traceback" not in mismatch.stderr


def test_rerun_after_a_crash_reuses_masks_and_model(tmp_path, tiny_args):
    out = tmp_path / "run"
    first = _run([*tiny_args, "--output_dir", str(out), "--eval_dense", "false"])
    assert first.returncode == 0
    digest = json.loads((out / "report.json").read_text())["masks_digest"]
    (out / "report.json").unlink()  # as if the run died during the final evaluation
    again = _run([*tiny_args, "--output_dir", str(out), "--eval_dense", "false"])
    assert again.returncode == 0 and "pruning skipped" in again.stdout
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["masks_digest"] == digest
    assert "resume_s" in resumed["timings"] and "prune_s" not in resumed["timings"]  # no pruning was timed
    (out / "report.json").unlink()
    int8 = _run([*tiny_args, "--output_dir", str(out), "--eval_dense", "false", "--export_values", "int8"])
    assert int8.returncode == 0 and "pruning skipped" in int8.stdout  # the same masks: resumed
    sparse = json.loads((out / "model-sparse" / "config.json").read_text())["dlp_compressed"]
    assert sparse["values"] == "int8"  # the sparse copy follows the recipe, not the run it resumed
    (out / "report.json").unlink()
    changed = _run([*tiny_args, "--output_dir", str(out), "--eval_dense", "false", "--sparsity", "0.5"])
    assert changed.returncode == 0 and "pruning skipped" not in changed.stdout  # other recipe: masks not reused
    assert json.loads((out / "report.json").read_text())["masks_digest"] != digest
