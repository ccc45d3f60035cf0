"""Every user mistake, in every entry script, ends the same way: exit code 2, exactly one stderr line starting with
"error: " (no traceback), found before any heavy work, and output_dir left as it was (or absent).

All cases run in one subprocess (tests/malformed_driver.py): starting Python with torch, transformers and trl
costs seconds, a few dozen of them would cost minutes. Every case uses small settings, so that if a check were
missing the run would still end quickly (and fail here) instead of hanging.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, save_tiny_model, tiny_model

DRIVER = str(REPO / "tests" / "malformed_driver.py")
PRUNE, LORA, SLICE, MERGE, MASKS = (
    str(REPO / "train" / f"{name}.py") for name in ("prune", "prune_lora", "slice", "merge", "masks")
)
MAX_CASE_SECONDS = 60
# what only a run that got past its checks prints on stdout (calibration, evaluation, training, saving)
HEAVY_WORK_MARKERS = (
    "perplexity",
    "layer sparsities",
    "sliced widths",
    "trainable params",
    "masked model saved",
    "[dlp] merged",
    "'loss'",
    "train_runtime",
)

SMALL = ["--nsamples", "2", "--seqlen", "16", "--eval_seqlen", "16", "--eval_max_windows", "1", "--device", "cpu"]
P = ["--model_name_or_path", "{llama}", *SMALL, "--output_dir", "{out}"]  # prune.py / slice.py, llama
P_OPT = ["--model_name_or_path", "{opt}", *SMALL, "--output_dir", "{out}"]
L = [
    *P,
    "--max_length",
    "16",
    "--max_steps",
    "1",
    "--train_max_windows",
    "2",
    "--per_device_train_batch_size",
    "1",
    "--report_to",
    "none",
]  # prune_lora.py
L_OPT = [
    *P_OPT,
    "--max_length",
    "16",
    "--max_steps",
    "1",
    "--train_max_windows",
    "2",
    "--per_device_train_batch_size",
    "1",
    "--report_to",
    "none",
]
M = ["--base_dir", "{llama}", "--adapter_dir", "{adapter}", "--masks", "{masks3}", "--output_dir", "{out}"]  # merge.py

# YAML recipes: small settings inside, the mistake on top ("{llama}" is filled in with the tiny model's path)
SMALL_YAML = (
    "model_name_or_path: {llama}\nnsamples: 2\nseqlen: 16\neval_seqlen: 16\neval_max_windows: 1\n"
    "device: cpu\nmax_length: 16\nmax_steps: 1\ntrain_max_windows: 2\n"
)
RECIPES = {
    "yaml_bad": SMALL_YAML + "sparsity: [0.5\nallocation: dlp\n",
    "yaml_list": "- sparsity: 0.5\n- allocation: dlp\n",
    "yaml_unknown": SMALL_YAML + "sparsty: 0.5\n",
    "yaml_nsamples_list": SMALL_YAML.replace("nsamples: 2", "nsamples: [1]"),
    "yaml_nsamples_abc": SMALL_YAML.replace("nsamples: 2", "nsamples: abc"),
    "yaml_sparsity": SMALL_YAML + "sparsity: 1.2\n",
}
# prune_lora's recipes may hold training fields; prune.py's may not, so its recipes leave them out
PRUNE_RECIPE_DROP = ("max_length: 16\n", "max_steps: 1\n", "train_max_windows: 2\n")

# (script, mistake, argv, expected substring of the error line, output_dir before the run)
# output_dir kinds: absent (a new path), file (a regular file), foreign (a non-empty directory of the user's),
# under_file (a path below a regular file), None (the case has no output_dir)
CASES = [
    # --- train/prune.py: the recipe file
    (PRUNE, "yaml-syntax", ["--config", "{prune_yaml_bad}", "--output_dir", "{out}"], "is not valid YAML", "absent"),
    (
        PRUNE,
        "yaml-list",
        ["--config", "{prune_yaml_list}", "--output_dir", "{out}"],
        "must be a YAML mapping",
        "absent",
    ),
    (PRUNE, "yaml-unknown-key", ["--config", "{prune_yaml_unknown}", "--output_dir", "{out}"], "sparsty", "absent"),
    (
        PRUNE,
        "yaml-nsamples-list",
        ["--config", "{prune_yaml_nsamples_list}", "--output_dir", "{out}"],
        "nsamples takes a single value",
        "absent",
    ),
    (
        PRUNE,
        "yaml-nsamples-abc",
        ["--config", "{prune_yaml_nsamples_abc}", "--output_dir", "{out}"],
        "invalid int value: 'abc'",
        "absent",
    ),
    (
        PRUNE,
        "yaml-sparsity-1.2",
        ["--config", "{prune_yaml_sparsity}", "--output_dir", "{out}"],
        "sparsity must be in [0, 1) (got 1.2)",
        "absent",
    ),
    (PRUNE, "config-file-missing", ["--config", "{missing}/recipe.yaml", *P], "config: cannot read", "absent"),
    (PRUNE, "config-without-path", [*P, "--config"], "--config needs a recipe file", "absent"),
    # --- train/prune.py: values on the command line
    (PRUNE, "sparsity-abc", [*P, "--sparsity", "abc"], "invalid float value: 'abc'", "absent"),
    (PRUNE, "unknown-flag", [*P, "--bogus_flag", "1"], "--bogus_flag", "absent"),
    (PRUNE, "allocation-best", [*P, "--allocation", "best"], "allocation must be one of", "absent"),
    (PRUNE, "pattern-4-8", [*P, "--pattern", "4-8"], "pattern must be 'unstructured' or 'N:M'", "absent"),
    (
        PRUNE,
        "pattern-2of4-allocation-dlp",
        [*P, "--pattern", "2:4", "--sparsity", "0.5"],
        "allocation must be uniform",
        "absent",
    ),
    (
        PRUNE,
        "pattern-3of7-does-not-fit",
        [*P, "--pattern", "3:7", "--allocation", "uniform", "--sparsity", repr(4 / 7)],
        "not a multiple of 7",
        "absent",
    ),
    (
        PRUNE,
        "explicit-out-of-range",
        [*P, "--allocation", "explicit", "--layer_sparsities", "1.5,0.2"],
        "layer_sparsities: every value must be in",
        "absent",
    ),
    (
        PRUNE,
        "explicit-wrong-length",
        [*P, "--allocation", "explicit", "--layer_sparsities", "0.5,0.6"],
        "layer_sparsities must list 3 values",
        "absent",
    ),
    (
        PRUNE,
        "explicit-without-list",
        [*P, "--allocation", "explicit"],
        "allocation=explicit needs layer_sparsities",
        "absent",
    ),
    (
        PRUNE,
        "max-layer-sparsity-below-target",
        [*P, "--max_layer_sparsity", "0.5", "--sparsity", "0.7"],
        "max_layer_sparsity (0.5) must be >= sparsity",
        "absent",
    ),
    (PRUNE, "criterion-bogus", [*P, "--criterion", "bogus"], "criterion must be one of", "absent"),
    (
        PRUNE,
        "fast-sparsegpt",
        [*P, "--prune_mode", "fast", "--criterion", "sparsegpt"],
        "prune_mode fast supports",
        "absent",
    ),
    (PRUNE, "nsamples-0", [*P, "--nsamples", "0"], "nsamples must be >= 1", "absent"),
    # --- train/prune.py: the model
    (PRUNE, "model-dir-missing", [*P, "--model_name_or_path", "{missing}/model"], "no such directory", "absent"),
    (PRUNE, "model-truncated-gguf", [*P, "--model_name_or_path", "{gguf}"], "model: cannot read", "absent"),
    (
        PRUNE,
        "model-gguf-missing",
        [*P, "--model_name_or_path", "{missing}/model.gguf"],
        "GGUF file not found",
        "absent",
    ),
    (PRUNE, "model-dir-without-config", [*P, "--model_name_or_path", "{noconfig}"], "holds no config.json", "absent"),
    (PRUNE, "opt-seqlen-5000", [*P_OPT, "--seqlen", "5000"], "error: seqlen must be <= 256", "absent"),
    (PRUNE, "opt-eval-seqlen-5000", [*P_OPT, "--eval_seqlen", "5000"], "eval_seqlen must be <= 256", "absent"),
    # --- train/prune.py: output_dir
    (PRUNE, "output-dir-is-file", P, "is a file, not a directory", "file"),
    (PRUNE, "output-dir-under-file", P, "is a file, so", "under_file"),
    (PRUNE, "output-dir-foreign", P, "is not empty and was not written by dlp", "foreign"),
    (
        PRUNE,
        "output-dir-foreign-overwrite",
        [*P, "--overwrite", "true"],
        "is not empty and was not written by dlp",
        "foreign",
    ),
    # --- train/prune.py: data and device
    (
        PRUNE,
        "calibration-builtin-unknown",
        [*P, "--calibration_data", "builtin:nothing"],
        "calibration_data: data source 'builtin:nothing' unknown",
        "absent",
    ),
    (PRUNE, "calibration-binary-txt", [*P, "--calibration_data", "{binary}"], "is not UTF-8 text", "absent"),
    (
        PRUNE,
        "calibration-is-directory",
        [*P, "--calibration_data", "{llama}"],
        "is a directory, not a text file",
        "absent",
    ),
    (PRUNE, "calibration-wrong-suffix", [*P, "--calibration_data", "{wrong_suffix}"], "must end in .jsonl", "absent"),
    (PRUNE, "eval-builtin-unknown", [*P, "--eval_data", "builtin:nothing"], "eval_data: data source", "absent"),
    (PRUNE, "device-cuda", [*P, "--device", "cuda:0"], "CUDA is not available", "absent"),
    (PRUNE, "device-bogus", [*P, "--device", "tpu9"], "device must be auto, cpu, cuda", "absent"),
    # --- train/prune_lora.py
    (LORA, "yaml-syntax", ["--config", "{lora_yaml_bad}", "--output_dir", "{out}"], "is not valid YAML", "absent"),
    (
        LORA,
        "yaml-sparsity-1.2",
        ["--config", "{lora_yaml_sparsity}", "--output_dir", "{out}"],
        "sparsity must be in [0, 1) (got 1.2)",
        "absent",
    ),
    (LORA, "lora-r-0", [*L, "--lora_r", "0"], "lora_r must be >= 1", "absent"),
    (LORA, "lora-dropout-1", [*L, "--lora_dropout", "1.0"], "lora_dropout must be in [0, 1)", "absent"),
    (LORA, "use-dora", [*L, "--use_dora", "true"], "use_dora must be false", "absent"),
    (LORA, "load-in-8bit", [*L, "--load_in_8bit", "true"], "load_in_8bit is not supported", "absent"),
    (
        LORA,
        "merge-base-dequantized-without-4bit",
        [*L, "--merge_base", "dequantized"],
        "merge_base dequantized needs load_in_4bit",
        "absent",
    ),
    (LORA, "merge-base-bogus", [*L, "--merge_base", "bogus"], "merge_base must be one of", "absent"),
    (LORA, "method-bogus", [*L, "--method", "bogus"], "method must be one of", "absent"),
    (LORA, "max-length-1", [*L, "--max_length", "1"], "max_length must be >= 2", "absent"),
    (
        LORA,
        "train-data-is-eval-data",
        [*L, "--train_data", "builtin:wikitext2-test"],
        "train_data must not be the evaluation text",
        "absent",
    ),
    (LORA, "train-data-builtin-unknown", [*L, "--train_data", "builtin:nothing"], "train_data: data source", "absent"),
    (
        LORA,
        "slice-with-4bit",
        [*L, "--method", "slice", "--load_in_4bit", "true"],
        "load_in_4bit is supported with method prune only",
        "absent",
    ),
    (
        LORA,
        "slice-opt",
        [*L_OPT, "--method", "slice"],
        "model_type 'opt' cannot be sliced exactly: its blocks use LayerNorm",
        "absent",
    ),
    (LORA, "prune-dir-missing", [*L, "--prune_dir", "{missing}/prune"], "holds no masks.safetensors", "absent"),
    (LORA, "prune-dir-other-model", [*L, "--prune_dir", "{prune_dir_2layer}"], "decoder layers 2", "absent"),
    (LORA, "opt-max-length-5000", [*L_OPT, "--max_length", "5000"], "max_length must be <= 256", "absent"),
    (
        LORA,
        "bnb-quant-type-bogus",
        [*L, "--load_in_4bit", "true", "--bnb_4bit_quant_type", "bogus"],
        "bnb_4bit_quant_type",
        "absent",
    ),
    (LORA, "device-cuda", [*L, "--device", "cuda:0"], "CUDA is not available", "absent"),
    (LORA, "output-dir-is-file", L, "is a file, not a directory", "file"),
    (LORA, "output-dir-foreign", L, "is not empty and was not written by dlp", "foreign"),
    (
        LORA,
        "output-dir-foreign-overwrite",
        [*L, "--overwrite", "true"],
        "is not empty and was not written by dlp",
        "foreign",
    ),
    # --- train/slice.py
    (SLICE, "slicing-1.5", [*P, "--slicing", "1.5"], "slicing must be in [0, 1)", "absent"),
    (
        SLICE,
        "slicing-allocation-bogus",
        [*P, "--slicing_allocation", "bogus"],
        "slicing_allocation must be one of",
        "absent",
    ),
    (
        SLICE,
        "spread-above-slicing",
        [*P, "--slicing", "0.1", "--slicing_spread", "0.2"],
        "slicing_spread (0.2) must not exceed slicing",
        "absent",
    ),
    (SLICE, "opt-model", P_OPT, "model_type 'opt' cannot be sliced exactly: its blocks use LayerNorm", "absent"),
    (SLICE, "model-dir-without-config", [*P, "--model_name_or_path", "{noconfig}"], "holds no config.json", "absent"),
    (SLICE, "device-cuda", [*P, "--device", "cuda:0"], "CUDA is not available", "absent"),
    (SLICE, "output-dir-is-file", P, "is a file, not a directory", "file"),
    (SLICE, "output-dir-foreign", P, "is not empty and was not written by dlp", "foreign"),
    # --- train/merge.py
    (MERGE, "missing-required-flags", [], "the following arguments are required", None),
    (MERGE, "base-dir-missing", [*M, "--base_dir", "{missing}/model"], "no such directory", "absent"),
    (
        MERGE,
        "base-dir-missing-no-masks",
        ["--base_dir", "{missing}/model", "--adapter_dir", "{adapter}", "--output_dir", "{out}"],
        "masks: file not found",
        "absent",
    ),
    (
        MERGE,
        "adapter-dir-missing",
        [*M, "--adapter_dir", "{missing}/adapter"],
        "adapter_dir: no adapter_config.json",
        "absent",
    ),
    (MERGE, "merge-base-bogus", [*M, "--merge_base", "bogus"], "merge_base must be one of", "absent"),
    (MERGE, "dtype-bogus", [*M, "--dtype", "int8"], "dtype must be one of", "absent"),
    (MERGE, "masks-not-safetensors", [*M, "--masks", "{text}"], "is not a dlp mask file", "absent"),
    (MERGE, "output-dir-foreign", M, "is not empty and was not written by dlp", "foreign"),
    (MERGE, "output-dir-under-file", M, "is a file, so", "under_file"),
    # --- train/masks.py
    (MASKS, "unknown-command", ["bogus", "--masks", "{masks3}"], "invalid choice: 'bogus'", None),
    (MASKS, "missing-masks-flag", ["report"], "the following arguments are required: --masks", None),
    (MASKS, "masks-file-missing", ["report", "--masks", "{missing}/masks.safetensors"], "masks: file not found", None),
    (MASKS, "text-file-as-masks", ["report", "--masks", "{text}"], "is not a dlp mask file", None),
    (MASKS, "verify-without-model", ["verify", "--masks", "{masks3}"], "--model is required for verify", None),
    (
        MASKS,
        "verify-3-layer-masks-on-2-layer-model",
        ["verify", "--masks", "{masks3}", "--model", "{llama2}"],
        "decoder layers 3",
        None,
    ),
    (
        MASKS,
        "apply-without-output-dir",
        ["apply", "--masks", "{masks3}", "--model", "{llama}"],
        "--output_dir is required for apply",
        None,
    ),
    (
        MASKS,
        "apply-2-layer-masks-on-3-layer-model",
        ["apply", "--masks", "{masks2}", "--model", "{llama}", "--output_dir", "{out}"],
        "decoder layers 2",
        "absent",
    ),
    (
        MASKS,
        "apply-output-dir-foreign",
        ["apply", "--masks", "{masks3}", "--model", "{llama}", "--output_dir", "{out}"],
        "is not empty and was not written by dlp",
        "foreign",
    ),
    (
        MASKS,
        "apply-output-dir-is-file",
        ["apply", "--masks", "{masks3}", "--model", "{llama}", "--output_dir", "{out}"],
        "is a file, not a directory",
        "file",
    ),
    (MASKS, "bogus-flag", ["report", "--masks", "{masks3}", "--bogus"], "unrecognized arguments: --bogus", None),
]
CASE_IDS = [f"{Path(script).stem}-{mistake}" for script, mistake, *_ in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS), "case ids must be unique"
USER_FILE = "notes.txt"  # the user's file inside every "foreign" output_dir


def _mask_file(path: Path, layers: int) -> Path:
    from dlp.masks import MaskSet, model_fingerprint
    from dlp.modeling import prunable_linears
    from dlp.projections import logical_shape

    model = tiny_model("llama", layers=layers)
    gen = torch.Generator().manual_seed(layers)
    masks = {
        name: torch.rand(logical_shape(module), generator=gen) > 0.5 for name, module in prunable_linears(model).items()
    }
    return MaskSet(masks, {"model": f"tiny-llama-{layers}", "fingerprint": model_fingerprint(model)}).save(path)


def _inputs(root: Path, llama: Path) -> dict[str, str]:
    """Every input file the cases name (the mistakes among them included)."""
    paths = {
        "llama": llama,
        "opt": save_tiny_model(root / "tiny-opt", "opt"),
        "llama2": save_tiny_model(root / "tiny-llama-2", "llama", layers=2),
        "missing": root / "does-not-exist",
    }
    paths["masks3"] = _mask_file(root / "masks-3-layer.safetensors", 3)
    paths["masks2"] = _mask_file(root / "masks-2-layer.safetensors", 2)
    (root / "prune-2-layer").mkdir()  # a "finished prune run" whose masks belong to another model
    paths["prune_dir_2layer"] = _mask_file(root / "prune-2-layer" / "masks.safetensors", 2).parent
    paths["noconfig"] = root / "no-config"
    paths["noconfig"].mkdir()
    (paths["noconfig"] / "model.safetensors").write_bytes(b"\0" * 16)
    paths["binary"] = root / "calib.txt"
    paths["binary"].write_bytes(b"ordinary text, then \xff\xfe\x00\x81 binary bytes\n" * 8)
    paths["wrong_suffix"] = root / "calib.csv"
    paths["wrong_suffix"].write_text("text,label\nsome words,1\n")
    paths["text"] = root / "notes.txt"
    paths["text"].write_text("this is a text file, not a safetensors mask file\n" * 4)
    paths["gguf"] = root / "truncated.gguf"
    paths["gguf"].write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(7, 40)))
    paths["adapter"] = root / "adapter"  # passes merge.py's adapter_config.json check, so base_dir is reached
    paths["adapter"].mkdir()
    (paths["adapter"] / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    for name, text in RECIPES.items():
        filled = text.replace("{llama}", str(llama))
        paths[f"lora_{name}"] = root / f"lora_{name}.yaml"
        paths[f"lora_{name}"].write_text(filled)
        for line in PRUNE_RECIPE_DROP:
            filled = filled.replace(line, "")
        paths[f"prune_{name}"] = root / f"prune_{name}.yaml"
        paths[f"prune_{name}"].write_text(filled)
    return {key: str(value) for key, value in paths.items()}


def _make_output(case_dir: Path, kind: str | None) -> tuple[str | None, list[Path]]:
    """The case's output_dir, prepared as ``kind`` says; and the paths that must not change."""
    if kind is None:
        return None, []
    out = case_dir / "out"
    if kind == "absent":
        return str(out), [out]
    if kind == "file":
        out.write_text("the user's file, not a directory\n")
        return str(out), [out]
    if kind == "foreign":
        out.mkdir()
        (out / USER_FILE).write_text("the user's own notes; dlp must never touch them\n")
        (out / "data").mkdir()
        (out / "data" / "table.csv").write_text("a,b\n1,2\n")
        return str(out), [out]
    if kind == "under_file":
        blocker = case_dir / "blocker"
        blocker.write_text("a regular file where a directory would have to be\n")
        return str(blocker / "out"), [blocker, blocker / "out"]
    raise AssertionError(kind)


def snapshot(path: Path) -> list | None:
    """Names, kinds, sizes, mtimes and content hashes of ``path`` and everything below it (None: absent)."""
    if not os.path.lexists(path):
        return None
    entries = []
    for item in [path, *sorted(path.rglob("*"))] if path.is_dir() and not path.is_symlink() else [path]:
        info = item.lstat()
        digest = hashlib.sha256(item.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
        entries.append((str(item.relative_to(path)), stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, digest))
    return entries


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("malformed")
    (root / "inputs").mkdir()
    inputs = _inputs(root / "inputs", tiny_model_dir)
    cases, prepared = [], {}
    for case_id, (script, _, argv, _, kind) in zip(CASE_IDS, CASES):
        case_dir = root / "cases" / case_id
        (case_dir / "cwd").mkdir(parents=True)
        out, watched = _make_output(case_dir, kind)
        cases.append(
            {
                "id": case_id,
                "script": script,
                "argv": [a.format(out=out, **inputs) for a in argv],
                "cwd": str(case_dir / "cwd"),
            }
        )
        prepared[case_id] = {path: snapshot(path) for path in watched}
    (root / "cases.json").write_text(json.dumps(cases, indent=1))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DLP_CACHE": str(root / "cache")}
    env.pop("RANK", None)
    done = subprocess.run(
        [sys.executable, DRIVER, str(root / "cases.json"), str(root / "results.json")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads((root / "results.json").read_text())
    return {case_id: (found[case_id], prepared[case_id]) for case_id in CASE_IDS}


def test_enough_cases_covering_every_script():
    assert len(CASES) >= 40
    assert {script for script, *_ in CASES} == {PRUNE, LORA, SLICE, MERGE, MASKS}


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_user_mistake_is_one_line_and_exit_2(results, case):
    script, mistake, _, expected, kind = case
    result, before = results[f"{Path(script).stem}-{mistake}"]
    stderr, stdout = result["stderr"], result["stdout"]
    summary = f"exit {result['code']}, stderr: {stderr[:1500]!r}"
    assert result["uncaught"] is None, summary
    assert "Traceback" not in stderr and "Traceback" not in stdout, summary
    assert result["code"] == 2, summary
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and len(stderr.strip().splitlines()) == 1, summary
    assert lines[0].startswith("error: "), summary
    assert expected in lines[0], summary
    heavy = [marker for marker in HEAVY_WORK_MARKERS if marker in stdout]
    assert not heavy, f"the mistake was found only after heavy work ({heavy}); stdout: {stdout[-1500:]!r}"
    assert result["elapsed"] < MAX_CASE_SECONDS, f"{result['elapsed']:.1f}s"
    for path, state in before.items():
        now = snapshot(path)
        if state is None:
            assert now is None, f"{path} was created: {now}"
        else:
            assert now == state, f"{path} changed"
    if kind == "foreign":
        assert (Path(next(iter(before))) / USER_FILE).is_file()
