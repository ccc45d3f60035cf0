"""Regression tests for the trust issue: dlp never deletes what it did not create, refuses masks made for another
model, refuses allocations it cannot honour, leaves nothing half-written behind, writes the same bytes for the
same inputs, and reports user mistakes found before any heavy work in one line.

Each test failed on main at 8939327 (the commit the issue was filed against)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, save_tiny_model, tiny_model
from dlp.errors import DlpError, ResultCheckFailed
from dlp.rundir import MARKER, TEMP_PREFIX, atomic_dir, claim_dir
from dlp.masks import MaskSet, model_fingerprint
from dlp.modeling import prunable_linears
from dlp.process import cpu_has_bf16_matrix_units
from test_cli import SCRIPT as PRUNE, _run

MASKS_TOOL = str(REPO / "train" / "masks.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def masks_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, MASKS_TOOL, *args], capture_output=True, text=True, env=ENV, timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


@pytest.fixture
def pruned(tmp_path, tiny_args) -> Path:
    """A finished prune run of the tiny 3-layer Llama."""
    out = tmp_path / "run"
    result = _run([*tiny_args, "--output_dir", str(out), "--eval_dense", "false"])
    assert result.returncode == 0, result.stderr[-2000:]
    return out


# --- 1. no data loss -----------------------------------------------------------------------------------------------
def test_masks_apply_refuses_an_existing_directory_it_did_not_create(pruned, tiny_model_dir, tmp_path):
    """The regression: `masks.py apply --output_dir D` deleted D and everything in it."""
    users = tmp_path / "users_dir"
    users.mkdir()
    (users / "thesis.tex").write_text("years of work")
    result = masks_tool(
        "apply",
        "--masks",
        str(pruned / "masks.safetensors"),
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(users),
    )
    assert result.returncode == 2 and "was not written by dlp" in one_error_line(result)
    assert sorted(p.name for p in users.iterdir()) == ["thesis.tex"]
    assert (users / "thesis.tex").read_text() == "years of work"
    fresh = tmp_path / "applied"
    for _ in range(2):  # a directory dlp made is dlp's to replace
        result = masks_tool(
            "apply",
            "--masks",
            str(pruned / "masks.safetensors"),
            "--model",
            str(tiny_model_dir),
            "--output_dir",
            str(fresh),
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert (fresh / MARKER).is_file() and (fresh / "config.json").is_file()


def test_overwrite_removes_only_dlps_own_artifacts(pruned, tiny_args, tmp_path):
    (pruned / "my_notes.txt").write_text("keep me")
    (pruned / "my_plots").mkdir()
    (pruned / "my_plots" / "a.png").write_bytes(b"png")
    result = _run([*tiny_args, "--output_dir", str(pruned), "--eval_dense", "false", "--overwrite", "true"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kept what dlp did not write" in result.stdout and "my_notes.txt" in result.stdout
    assert (pruned / "my_notes.txt").read_text() == "keep me" and (pruned / "my_plots" / "a.png").is_file()
    assert (pruned / "report.json").is_file() and (pruned / "model" / "config.json").is_file()


def test_overwrite_refuses_a_directory_dlp_did_not_create(tiny_args, tmp_path):
    """The regression: --overwrite true deleted every file of a directory dlp did not make."""
    users = tmp_path / "users_dir"
    users.mkdir()
    (users / "data.csv").write_text("1,2,3")
    result = _run([*tiny_args, "--output_dir", str(users), "--overwrite", "true"])
    assert result.returncode == 2 and "was not written by dlp" in one_error_line(result)
    assert [p.name for p in users.iterdir()] == ["data.csv"]


def test_a_resumed_run_removes_what_a_killed_export_left(pruned, tiny_args):
    """The regression: kill -9 during export left `model.tmpXXXX/` (config and weights), still there after the
    resumed run finished. Here a process dies inside the atomic write of model/, as kill -9 would stop it."""
    (pruned / "report.json").unlink()  # the run is unfinished again
    die = (
        "import os, sys; from pathlib import Path; from dlp.rundir import atomic_dir\n"
        "with atomic_dir(Path(sys.argv[1]) / 'model') as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 1000); os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", die, str(pruned)], cwd=REPO, env=ENV).returncode == 9
    stale = [p for p in pruned.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert len(stale) == 1 and stale[0].is_dir()
    result = _run([*tiny_args, "--output_dir", str(pruned), "--eval_dense", "false"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "left half-written by an interrupted run" in result.stdout
    assert not [p for p in pruned.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def test_claim_dir_rules(tmp_path, monkeypatch):
    assert (claim_dir(tmp_path / "new" / "run") / MARKER).is_file()  # created, with parents
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (claim_dir(empty) / MARKER).is_file()  # an empty directory is adopted
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DlpError, match="is a file, not a directory"):
        claim_dir(a_file)
    with pytest.raises(DlpError, match="is a file, so .* cannot be created"):
        claim_dir(a_file / "below")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)  # the tests run as root, which no chmod would stop
    with pytest.raises(DlpError, match=r"output_dir: cannot write to .* \(Permission denied\)"):
        claim_dir(tmp_path / "locked")


def test_atomic_dir_never_replaces_a_foreign_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"user's")
    with pytest.raises(DlpError, match="was not written by dlp"):
        with atomic_dir(target):
            pass
    assert (target / "weights.bin").read_bytes() == b"user's"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left either


# --- 2. masks bound to their model ---------------------------------------------------------------------------------
def test_masks_of_a_two_layer_model_are_refused_on_a_three_layer_one(tmp_path):
    """The regression: layer 2 stayed dense (46.4% real sparsity) while verify reported 0 violations and 69.62%."""
    small = tiny_model("llama", layers=2)
    masks = MaskSet(
        {name: torch.rand(lin.weight.shape) > 0.7 for name, lin in prunable_linears(small).items()},
        {"model": "tiny-2-layer", "fingerprint": model_fingerprint(small)},
    )
    masks.save(tmp_path / "masks.safetensors")
    big = tiny_model("llama", layers=3)
    with pytest.raises(DlpError, match=r"made for decoder layers 2, the model has 3"):
        masks.apply(big)
    save_tiny_model(tmp_path / "big", "llama")
    for command in ("verify", "apply"):
        result = masks_tool(
            command,
            "--masks",
            str(tmp_path / "masks.safetensors"),
            "--model",
            str(tmp_path / "big"),
            "--output_dir",
            str(tmp_path / "out"),
        )
        assert result.returncode == 2 and "made for decoder layers 2, --model has 3" in one_error_line(result)
    assert not (tmp_path / "out").exists()
    forced = masks_tool(
        "apply",
        "--force",
        "--masks",
        str(tmp_path / "masks.safetensors"),
        "--model",
        str(tmp_path / "big"),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert forced.returncode == 0 and "applying them anyway because of --force" in forced.stderr


def test_llama_masks_are_refused_on_a_qwen2_model_of_the_same_shapes():
    llama, qwen = tiny_model("llama"), tiny_model("qwen2")
    shapes = {n: tuple(m.weight.shape) for n, m in prunable_linears(llama).items()}
    assert shapes == {n: tuple(m.weight.shape) for n, m in prunable_linears(qwen).items()}  # names and shapes fit
    masks = MaskSet(
        {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}, {"fingerprint": model_fingerprint(llama)}
    )
    assert masks.violations(llama) == 0
    with pytest.raises(DlpError, match="made for architecture 'llama', the model has 'qwen2'"):
        masks.violations(qwen)


def test_prune_records_the_fingerprint_and_finetuning_and_merging_check_it(pruned, tmp_path):
    from types import SimpleNamespace

    from dlp.lora import masked_lora_model
    from dlp.merge import load_adapter_model

    masks = MaskSet.load(pruned / "masks.safetensors")
    assert masks.metadata["fingerprint"] == model_fingerprint(tiny_model("llama"))
    lora = SimpleNamespace(
        lora_r=2,
        lora_alpha=4,
        lora_dropout=0.0,
        lora_target_modules=None,
        use_dora=False,
        lora_modules_to_save=None,
        use_rslora=False,
    )
    with pytest.raises(DlpError, match="made for architecture 'llama', the model has 'qwen2'"):
        masked_lora_model(tiny_model("qwen2"), masks, lora)
    other = save_tiny_model(tmp_path / "two-layers", "llama", layers=2)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(DlpError, match="made for decoder layers 3, the model has 2"):
        load_adapter_model(other, tmp_path / "adapter", masks)


# --- 3. allocations the result must honour ---------------------------------------------------------------------------
def test_explicit_values_out_of_range_are_refused_before_loading(tiny_args, tmp_path):
    """The regression: 1.5,0.2 gave 59.46% overall while a warning said the mean 'stays 0.7000'."""
    result = _run(
        [
            *tiny_args,
            "--output_dir",
            str(tmp_path / "x"),
            "--allocation",
            "explicit",
            "--layer_sparsities",
            "1.5,0.2,0.5",
        ]
    )
    expected = "layer_sparsities: every value must be in [0, max_layer_sparsity=0.99] (got 1.5)"
    assert result.returncode == 2 and expected in one_error_line(result)
    assert not (tmp_path / "x").exists()


def test_explicit_list_is_its_own_target_and_is_met(tiny_args, tmp_path):
    out = tmp_path / "explicit"
    result = _run(
        [
            *tiny_args,
            "--output_dir",
            str(out),
            "--allocation",
            "explicit",
            "--layer_sparsities",
            "0.5,0.6,0.8",
            "--eval_dense",
            "false",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["target_sparsity"] == pytest.approx((0.5 + 0.6 + 0.8) / 3)
    assert abs(report["sparsity"]["overall"] - report["target_sparsity"]) <= 0.001
    assert report["layer_sparsity"]["measured"] == pytest.approx([0.5, 0.6, 0.8], abs=1e-3)


def test_a_missed_target_fails_loudly_and_saves_nothing():
    from dlp.stages.prune_stage import check_overall_sparsity

    masks = MaskSet({"a": torch.tensor([[True, False], [False, False]])})  # 75% sparse
    assert check_overall_sparsity(masks, 0.7504) == 0.75
    with pytest.raises(ResultCheckFailed, match=r"remove 75.00% of the weights, but the target was 70.00%"):
        check_overall_sparsity(masks, 0.70)


def test_max_layer_sparsity_below_sparsity_names_the_right_field(tiny_args, tmp_path):
    result = _run([*tiny_args, "--output_dir", str(tmp_path / "x"), "--max_layer_sparsity", "0.5"])
    assert result.returncode == 2 and one_error_line(result).startswith("error: max_layer_sparsity (0.5) must be >=")


# --- 5. same inputs, same bytes ---------------------------------------------------------------------------------------
def test_a_mask_file_has_the_same_bytes_in_every_process(tmp_path):
    """The regression: safetensors keeps metadata in a hash map, so each process wrote another header order."""
    write = (
        "import sys, torch; from dlp.masks import MaskSet\n"
        "g = torch.Generator().manual_seed(0)\n"
        "MaskSet({f'layer.{i}': torch.rand(4, 9, generator=g) > 0.5 for i in range(5)},\n"
        "        {'model': 'm', 'seed': 0, 'recipe': {'b': 1, 'a': 2}}).save(sys.argv[1])\n"
    )
    digests = set()
    for seed in ("1", "2", "3"):
        path = tmp_path / f"masks{seed}.safetensors"
        subprocess.run(
            [sys.executable, "-c", write, str(path)], cwd=REPO, check=True, env={**ENV, "PYTHONHASHSEED": seed}
        )
        digests.add(sha256(path))
    assert len(digests) == 1


def test_two_runs_with_one_seed_write_identical_artifacts(tiny_args, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert _run([*tiny_args, "--output_dir", str(out), "--eval_dense", "false"]).returncode == 0
    for artifact in ("masks.safetensors", "layer_scores.json", "model/model.safetensors", "model/config.json"):
        assert sha256(runs[0] / artifact) == sha256(runs[1] / artifact), artifact


# --- tracebacks that are now one line, found before heavy work --------------------------------------------------------
def test_yaml_syntax_error_is_one_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("sparsity: 0.5\n  allocation: [dlp\n")
    for script in (PRUNE, str(REPO / "train" / "prune_lora.py")):
        result = subprocess.run(
            [sys.executable, script, "--config", str(recipe), "--output_dir", str(tmp_path / "o")],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
        )
        assert result.returncode == 2 and f"config: {recipe} is not valid YAML at line 2" in one_error_line(result)
    assert not (tmp_path / "o").exists()


def test_a_bad_float_is_one_line_not_a_usage_dump(tmp_path):
    result = _run(["--sparsity", "seventy", "--output_dir", str(tmp_path / "o")])
    assert result.returncode == 2
    assert one_error_line(result) == "error: argument --sparsity: invalid float value: 'seventy' (see --help)"


def test_model_errors_come_before_any_heavy_work(tiny_args, tmp_path):
    """An explicit list of the wrong length used to be found after the dense perplexity."""
    result = _run(
        [*tiny_args, "--output_dir", str(tmp_path / "x"), "--allocation", "explicit", "--layer_sparsities", "0.5,0.6"]
    )
    assert result.returncode == 2 and "must list 3 values" in one_error_line(result)
    assert "perplexity" not in result.stdout + result.stderr and not (tmp_path / "x").exists()


def test_truncated_gguf_and_binary_calibration_text_are_one_line(tiny_args, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 7)
    result = _run([*tiny_args, "--output_dir", str(tmp_path / "x"), "--model_name_or_path", str(gguf)])
    assert result.returncode == 2 and f"model: cannot read '{gguf}'" in one_error_line(result)
    binary = tmp_path / "calib.txt"
    binary.write_bytes(b"some text \xff\xfe\x00 more")
    result = _run([*tiny_args, "--output_dir", str(tmp_path / "y"), "--calibration_data", str(binary)])
    assert result.returncode == 2 and "calibration_data: " in one_error_line(result)
    assert "is not UTF-8 text" in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_window_longer_than_learned_positions_is_refused_and_rope_only_warns(tmp_path, tiny_model_dir):
    from dlp.preflight import check_lengths, inspect_model

    opt = inspect_model(str(save_tiny_model(tmp_path / "opt", "opt")))
    assert opt.learned_positions and opt.max_positions == 256
    with pytest.raises(DlpError, match="eval_seqlen must be <= 256: opt has learned positions"):
        check_lengths(opt, seqlen=256, eval_seqlen=257)
    llama = inspect_model(str(tiny_model_dir))
    assert not llama.learned_positions and llama.num_layers == 3
    with pytest.warns(UserWarning, match="seqlen=512 exceeds the 256 positions llama was trained with"):
        check_lengths(llama, seqlen=512)


def test_short_calibration_text_warns_that_windows_overlap():
    from dlp.data import sample_windows

    with pytest.warns(UserWarning, match="fewer than nsamples × seqlen = 4 × 16: the windows overlap"):
        sample_windows(torch.arange(40), 4, 16, seed=0)


def test_unsupported_architecture_is_refused_from_its_config(tmp_path):
    from dlp.preflight import inspect_model

    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(DlpError, match="model: cannot read the config of"):
        inspect_model(str(tmp_path / "odd"))


def test_a_recipe_json_of_a_run_that_finished_nothing_does_not_block_a_rerun(tmp_path):
    from dlp.pipeline import _claim_output_dir

    class OneProcess:
        is_main_process = True

        def wait_for_everyone(self) -> None:
            pass

    out = claim_dir(tmp_path / "run")
    (out / "recipe.json").write_text(json.dumps({"model": {"model_name_or_path": "first"}}))
    _claim_output_dir(out, {"model": {"model_name_or_path": "second"}}, OneProcess())  # nothing reusable: replaced
    assert json.loads((out / "recipe.json").read_text())["model"]["model_name_or_path"] == "second"
    (out / "prune").mkdir()
    (out / "prune" / "masks.safetensors").write_bytes(b"")
    with pytest.raises(DlpError, match="holds a run of another recipe"):  # progress a rerun would reuse: refused
        _claim_output_dir(out, {"model": {"model_name_or_path": "third"}}, OneProcess())


def test_prune_lora_without_a_recipe_runs_on_cpu_and_says_in_which_precision(tiny_model_dir, tmp_path):
    """The regression: trl's bf16 default failed on a CPU machine with advice to set use_cpu. dlp chooses bf16
    autocast on a CPU with bf16 matrix units (AMX), float32 elsewhere, and says which."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train" / "prune_lora.py"),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path / "run"),
            "--nsamples",
            "2",
            "--seqlen",
            "32",
            "--eval_seqlen",
            "32",
            "--eval_max_windows",
            "1",
            "--max_length",
            "32",
            "--train_max_windows",
            "8",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if cpu_has_bf16_matrix_units():
        assert "CPU with bf16 matrix units (AMX): bf16 autocast, float32 weights (bf16: true" in result.stdout
    else:
        assert "no GPU here: training in float32 (bf16: false" in result.stdout
    assert "gemm_4bit_forward" not in result.stderr and "Setting accelerator to CPU" not in result.stderr


def test_every_settings_help_text_formats():
    """argparse %-formats help texts, so a bare "80%" in one field's help made every script's --help fail."""
    from trl import TrlParser

    import dlp.config as config

    settings = [
        kind for kind in vars(config).values() if isinstance(kind, type) and hasattr(kind, "__dataclass_fields__")
    ]
    assert len(settings) >= 5
    for kind in settings:
        assert TrlParser([kind]).format_help().startswith("usage:")


@pytest.mark.parametrize("script", ["prune.py", "slice.py", "prune_lora.py"])
def test_help_prints_every_setting(script):
    result = subprocess.run(
        [sys.executable, str(REPO / "train" / script), "--help"], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert result.returncode == 0, result.stderr[-500:]
    assert (
        result.stdout.startswith("usage:")
        and "--output_dir" in result.stdout
        and "--calibration_memory" in result.stdout
    )
