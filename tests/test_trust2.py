"""Regression tests for the second trust probe (issue 26): no stale, mixed or mismatched results, one run per
directory, contradictions refused before any work, and the last tracebacks made one line.

Each test failed on main at 1b2c27a (the commit the probe was run against): the finished-run shortcut answered a
changed recipe with its old result, two runs wrote into one directory at once, merge took an adapter trained on
other masks, a run resumed at its last checkpoint trained one step more, and the items below exited 0 or with a
traceback. Items 2 and 4 use real processes and real signals."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_tokenizer
from dlp.errors import DlpError
from dlp.rundir import LOCK_FILE, RunLock, atomic_dir, atomic_write_bytes
from dlp.masks import MaskSet
from test_cli import SCRIPT as PRUNE, _run
from test_prune_lora import kill_when, write_recipe

PIPELINE = str(REPO / "train" / "prune_lora.py")
MERGE = str(REPO / "train" / "merge.py")
SLICE = str(REPO / "train" / "slice.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def pipeline_recipe(path: Path, model_dir: Path, **overrides) -> Path:
    """A 10-step recipe with a constant learning rate (so one step more changes the adapter) and no ``seed`` key
    (item 9: the pipeline's default must be train/prune.py's)."""
    write_recipe(path, model_dir, max_steps=10, save_steps=5, lr_scheduler_type="constant", **overrides)
    path.write_text("".join(line for line in path.read_text().splitlines(True) if not line.startswith("seed:")))
    return path


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    """One uninterrupted pipeline run (10 steps, checkpoints at 5 and 10)."""
    root = tmp_path_factory.mktemp("trust2")
    recipe = pipeline_recipe(root / "recipe.yaml", tiny_model_dir)
    result = run(PIPELINE, "--config", str(recipe), "--output_dir", str(root / "run"), "--eval_dense", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


# --- 1. a finished run answers only its own recipe --------------------------------------------------------------------
def test_a_finished_prune_run_refuses_a_changed_recipe_and_redoes_it_only_with_overwrite(tiny_args, tmp_path):
    out = str(tmp_path / "run")
    assert _run([*tiny_args, "--output_dir", out, "--eval_dense", "false"]).returncode == 0
    same = _run([*tiny_args, "--output_dir", out, "--eval_dense", "false"])
    assert same.returncode == 0 and "already holds a finished run of this recipe" in same.stdout

    changed = subprocess.run(
        [sys.executable, PRUNE, *tiny_args, "--output_dir", out, "--eval_dense", "false", "--sparsity", "0.5"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "finished run of another recipe (sparsity: 0.7 → 0.5)" in one_error_line(changed)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["sparsity"]["overall"] == pytest.approx(0.7, 1e-3)

    redone = _run(
        [*tiny_args, "--output_dir", out, "--eval_dense", "false", "--sparsity", "0.5", "--overwrite", "true"]
    )
    assert redone.returncode == 0, redone.stderr[-2000:]
    assert "sparsity 50.00%" in redone.stdout


def test_a_finished_pipeline_run_refuses_a_changed_learning_rate(finished):
    recipe = finished.parent / "recipe.yaml"
    base = [PIPELINE, "--config", str(recipe), "--output_dir", str(finished), "--eval_dense", "false"]
    same = run(*base)
    assert same.returncode == 0 and "already holds a finished run of this recipe" in same.stdout
    changed = run(*base, "--learning_rate", "0.005")
    assert "finished run of another recipe (learning_rate: 0.002 → 0.005)" in one_error_line(changed)
    teacher = run(*base, "--teacher", "dense")  # recorded only when there is one: still compared
    assert "teacher: None → 'dense'" in one_error_line(teacher)


# --- 2. one run at a time per directory -------------------------------------------------------------------------------
def _start_and_stop_when_locked(args: list[str], out: Path) -> subprocess.Popen:
    """Start a run and freeze it (SIGSTOP) as soon as it holds ``out``'s lock, so a second run meets it there."""
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    lock = out / LOCK_FILE
    while time.time() < deadline and proc.poll() is None:
        if lock.is_file() and lock.read_text().strip() == str(proc.pid):
            proc.send_signal(signal.SIGSTOP)
            return proc
        time.sleep(0.005)
    raise AssertionError(f"the first run never took the lock: {proc.communicate()[1][-2000:]}")


def test_a_second_run_into_a_busy_directory_is_refused_and_a_killed_run_leaves_no_lock(tiny_args, tmp_path):
    out = tmp_path / "run"
    first = _start_and_stop_when_locked([PRUNE, *tiny_args, "--output_dir", str(out), "--eval_dense", "false"], out)
    try:
        second = run(PRUNE, *tiny_args, "--output_dir", str(out), "--eval_dense", "false", "--sparsity", "0.5")
        line = one_error_line(second)
        assert f"is in use by another dlp run (pid {first.pid})" in line and "--wait_for_lock true" in line
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up of any kind: the OS drops the flock
        first.wait()
    third = run(PRUNE, *tiny_args, "--output_dir", str(out), "--eval_dense", "false", "--sparsity", "0.5")
    assert third.returncode == 0, third.stderr[-2000:]
    assert "sparsity 50.00%" in third.stdout


def test_wait_for_lock_queues_behind_the_running_run_and_reuses_its_result(tiny_args, tmp_path):
    out = tmp_path / "run"
    args = [PRUNE, *tiny_args, "--output_dir", str(out), "--eval_dense", "false"]
    first = _start_and_stop_when_locked(args, out)
    second = subprocess.Popen(
        [sys.executable, *args, "--wait_for_lock", "true"],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(8)  # the second run reaches the lock and waits (it cannot finish while the first is frozen)
    assert second.poll() is None, second.communicate()[1][-2000:]
    first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-2000:]
    assert f"in use by another dlp run (pid {first.pid}); waiting" in stdout
    assert "already holds a finished run of this recipe" in stdout


def test_the_lock_is_reentrant_in_one_process_and_released_on_exit(tmp_path):
    with RunLock(tmp_path) as outer:
        outer.acquire()
        with RunLock(tmp_path) as inner:  # a stage inside the pipeline's run, say
            inner.acquire()
        assert str(tmp_path.resolve()) in RunLock._held
        probe = run("-c", f"from dlp.rundir import RunLock; RunLock({str(tmp_path)!r}).acquire()")
        assert probe.returncode == 1 and f"(pid {os.getpid()})" in probe.stderr
    assert str(tmp_path.resolve()) not in RunLock._held
    assert run("-c", f"from dlp.rundir import RunLock; RunLock({str(tmp_path)!r}).acquire()").returncode == 0


# --- 3. an adapter is merged only with the masks it was trained on ----------------------------------------------------
def test_merge_refuses_an_adapter_trained_on_other_masks(finished, tiny_args, tmp_path):
    binding = json.loads((finished / "adapter" / "dlp_adapter.json").read_text())
    assert binding["masks_digest"] == MaskSet.load(finished / "prune" / "masks.safetensors").digest()
    other = tmp_path / "p90"
    assert _run([*tiny_args, "--output_dir", str(other), "--eval_dense", "false", "--sparsity", "0.9"]).returncode == 0
    args = [MERGE, "--base_dir", str(other / "model"), "--adapter_dir", str(finished / "adapter")]
    refused = run(*args, "--output_dir", str(tmp_path / "merged"), "--probe_data", "")
    assert "does not belong to this base and masks: it was trained on masks" in one_error_line(refused)
    assert not (tmp_path / "merged").exists()
    forced = run(*args, "--output_dir", str(tmp_path / "merged"), "--probe_data", "", "--force", "true")
    assert forced.returncode == 0 and "merging it anyway because of --force" in forced.stderr


# --- 4. a run killed after its last step writes the uninterrupted run's bytes -----------------------------------------
def test_killed_after_the_last_step_resumes_without_training_more(finished, tiny_model_dir, tmp_path):
    recipe = finished.parent / "recipe.yaml"
    out = tmp_path / "run"
    args = [sys.executable, PIPELINE, "--config", str(recipe), "--output_dir", str(out), "--eval_dense", "false"]
    kill_when(args, out / "finetune" / "checkpoint-10" / "trainer_state.json")
    # SIGKILL lands between the last checkpoint and adapter/, or (a fast machine) a little after adapter/: take
    # away what came after the checkpoint, so the rerun always starts from "trained to the end, nothing saved"
    assert (out / "finetune" / "checkpoint-10").is_dir(), "killed before the last step"
    for name in ("adapter", "model", "merge.json", "eval.json", "report.json", "summary.md"):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    result = run(*args[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "nothing left to train" in result.stdout
    assert json.loads((out / "report.json").read_text())["training"]["global_steps"] == 10
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        assert (out / name).read_bytes() == (finished / name).read_bytes(), name


# --- 5-9. contradictions refused before any work ----------------------------------------------------------------------
def test_prune_dir_and_slice_dir_together_are_refused(finished, tmp_path):
    recipe = finished.parent / "recipe.yaml"
    result = run(
        PIPELINE, "--config", str(recipe), "--output_dir", str(tmp_path / "o"), "--prune_dir", "a", "--slice_dir", "b"
    )
    assert "prune_dir and slice_dir cannot both be set" in one_error_line(result)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", [PRUNE, SLICE])
def test_load_in_4bit_on_a_compression_script_is_refused(script, tiny_model_dir, tmp_path):
    args = ["--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "o"), "--load_in_4bit", "true"]
    assert "load_in_4bit: train/" in one_error_line(run(script, *args)) and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    path = tmp_path_factory.mktemp("tied")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_lora_targets_are_checked_against_the_model_before_any_work(tied_model_dir, tmp_path):
    """Through the script once (one line, exit 2, the prune stage never ran), then every kind of mistake against the
    model's config alone, as the script's preflight checks them."""
    from dlp.preflight import check_lora_targets, inspect_model

    recipe = pipeline_recipe(tmp_path / "recipe.yaml", tied_model_dir)
    out = tmp_path / "o"
    result = run(
        PIPELINE, "--config", str(recipe), "--output_dir", str(out), "--lora_target_modules", "q_proj", "lm_head"
    )
    assert "'lm_head' is lm_head, which llama ties to model.embed_tokens" in one_error_line(result)
    assert not out.exists(), "the prune stage ran first"
    plan = inspect_model(str(tied_model_dir))
    with pytest.raises(DlpError, match="'embed_tokens' is model.embed_tokens, which llama ties to lm_head"):
        check_lora_targets(plan, ["q_proj", "embed_tokens"])
    with pytest.raises(DlpError, match="'qkv_proj' names no Linear or Embedding module .* q_proj"):
        check_lora_targets(plan, ["q_proj", "qkv_proj"])
    check_lora_targets(plan, ["q_proj", "model.layers.0.mlp.down_proj"])  # names and dotted suffixes
    check_lora_targets(plan, "all-linear")  # peft's own keyword is peft's to check
    check_lora_targets(plan, None)  # the method's default targets


def test_a_recipe_key_given_twice_is_refused_with_its_lines(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("sparsity: 0.7\nallocation: dlp\nsparsity: 0.5\n")
    result = run(PRUNE, "--config", str(recipe), "--output_dir", str(tmp_path / "o"))
    assert f"config: {recipe} gives 'sparsity' twice (lines 1 and 3)" in one_error_line(result)


def test_a_bool_field_set_false_in_a_recipe_is_accepted(tiny_args, tmp_path):
    """Found on the way: ``eval_dense: false`` in a YAML recipe was refused ("must be a list"), because the check
    looked at the field's ``--no_eval_dense`` action instead of its ``--eval_dense`` one."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval_dense: false\nsave_model: false\n")
    args = [a for a in tiny_args if a not in ("--config",)]
    args.remove(next(a for a in args if a.endswith(".yaml")))
    result = _run(["--config", str(recipe), *args, "--output_dir", str(tmp_path / "o")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dense" not in json.loads((tmp_path / "o" / "report.json").read_text())["perplexity"]


def test_the_pipeline_seeds_like_prune_py_by_default(finished):
    """Item 9: the recipe sets no seed; trl's default would be 42, train/prune.py's is 0."""
    assert json.loads((finished / "recipe.json").read_text())["training"]["seed"] == 0
    assert MaskSet.load(finished / "prune" / "masks.safetensors").metadata["seed"] == 0


# --- 10. a full disk is one line --------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs: room for the tiny model's masks, not for its pruned model (root only: CI runs as root;
    elsewhere skipped, and the unit tests below still run)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_too_small_for_the_pruned_model_is_one_line_and_resumable(small_disk, tiny_args):
    out = small_disk / "run"
    args = [PRUNE, *tiny_args, "--output_dir", str(out), "--eval_dense", "false"]
    result = run(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]  # after the progress bars of the work it did
    assert re.fullmatch(
        rf"error: output_dir: not enough space in {out} to write model/: needs \d+ KB, \d+ KB free", last
    )
    assert (out / "masks.safetensors").is_file() and not (out / "model").exists()
    assert not any(p.name.startswith(".dlp-tmp") for p in out.iterdir()) and not (out / "report.json").exists()
    subprocess.run(["mount", "-o", "remount,size=2m", str(small_disk)], check=True)
    resumed = run(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_running_out_of_space_mid_write_is_one_line_and_leaves_nothing(small_disk):
    with pytest.raises(DlpError, match=r"no space left on the device of .* while writing model/"):
        with atomic_dir(small_disk / "model") as tmp:  # no size given: found only when the disk fills
            (tmp / "weights.bin").write_bytes(os.urandom(400_000))
    with pytest.raises(DlpError, match=r"not enough space in .* to write masks.safetensors: needs 391 KB"):
        atomic_write_bytes(small_disk / "masks.safetensors", bytes(400_000))
    assert list(small_disk.iterdir()) == []


def test_a_library_error_that_reports_a_full_disk_becomes_one_line(tmp_path):
    """safetensors reports ENOSPC in its own exception type, with the OS message inside."""
    code = (
        "from dlp.cli import run_cli\n"
        "from safetensors import SafetensorError\n"
        "def main():\n"
        "    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
        '"No space left on device" })\')\n'
        "run_cli(main)\n"
    )
    result = run("-c", code)
    assert "no space left on the device while writing" in one_error_line(result)


def test_saved_model_size_counts_tied_weights_once():
    from dlp.resources import saved_bytes

    layer = torch.nn.Linear(4, 3)
    tied = torch.nn.ModuleDict({"a": layer, "b": layer})
    assert saved_bytes(tied) == (12 + 3) * 4
