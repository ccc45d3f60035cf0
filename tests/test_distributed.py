"""Several processes on CPU: DDP, DeepSpeed ZeRO-2 and ZeRO-3 runs of the same recipe export the same model as a
one-process run (bit-identical masks, exact zeros, merged weights within 1e-4 of each tensor's largest weight, in
float32 without dropout: see ``test_two_processes_export_the_one_process_model``), and ranks refuse to train under
different masks."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO
from dlp.errors import DlpError
from dlp.masks import MaskSet
from test_prune_lora import SCRIPT, assert_compressed_copy_is_the_model, merged_weights, run, write_recipe

STEPS, GLOBAL_BATCH = 6, 2  # a few optimizer steps of 2 windows each, however many processes share them


def launch(config: str, recipe: Path, out: Path, *extra: str):
    return run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "accelerate_configs" / config),
            str(SCRIPT),
            "--config",
            str(recipe),
            "--output_dir",
            str(out),
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def one_process_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process")
    recipe = write_recipe(
        out / "recipe.yaml", tiny_model_dir, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH, save_steps=3
    )
    result = run([sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(out / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


@pytest.mark.parametrize(
    "config",
    [
        "ddp.yaml",
        pytest.param("deepspeed_zero2.yaml", marks=needs_deepspeed),
        pytest.param("deepspeed_zero3.yaml", marks=needs_deepspeed),
    ],
)
def test_two_processes_export_the_one_process_model(config, one_process_run, tiny_model_dir, tmp_path):
    """One process with batch 2 against two with batch 1 each: the same global batch, the same windows in the same
    order, the same seeded adapter initialisation. Settings (``write_recipe``): tiny Llama, float32 (``bf16: false``
    even on an AMX CPU, where dlp would pick bf16), ``lora_dropout: 0``, 6 AdamW steps of 2 windows × 64 tokens at
    learning rate 2e-3, r = 4.

    Exact: the masks (one process prunes; the digest is compared) and the pruned zeros. Not exact: training. The
    gradient of 2 windows summed in one matmul and the mean of two 1-window gradients all-reduced are the same sum
    in another order (float32: ~3e-7 relative apart), and Adam's first steps, about lr·sign(g), amplify that on small
    gradient entries: after these 6 steps lora_B is 2e-6 apart in norm (4e-4 on its worst entry), lora_A 2e-7.
    Compared: each merged weight tensor, max |Δ| ≤ 1e-4 · max |W| (about 7e-6 here, 1e-3 of the 8e-3 the training
    moved the weights); measured 6e-7 (DDP, AMD EPYC with AVX-512, no AMX). The adapters themselves are not
    compared: their small entries differ by more. Neither would pass with bf16 autocast (partial sums rounded to
    8 bits: lora_B 0.6% apart in norm here, merged weights 1e-3 · max |W|) nor with dropout (the ranks draw other
    dropout masks than the one process: lora_B 59% apart)."""
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        tiny_model_dir,
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // 2,
        save_steps=3,
    )
    result = launch(config, recipe, tmp_path / "run")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert result.stdout.count("[dlp] results in") == 1  # the result lines once, not once per rank
    assert "gemm_4bit_forward" not in result.stderr  # bitsandbytes' notice about a kernel dlp never uses
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    reference = json.loads((one_process_run / "report.json").read_text())
    assert report["training"]["tokens_seen"] == reference["training"]["tokens_seen"] == STEPS * GLOBAL_BATCH * 64
    assert report["masks_digest"] == reference["masks_digest"]
    assert report["merge"]["violations"] == 0 and report["export"]["reloaded_violations"] == 0
    masks = MaskSet.load(tmp_path / "run" / "model" / "masks.safetensors")
    ours, theirs = merged_weights(tmp_path / "run"), merged_weights(one_process_run)
    assert ours.keys() == theirs.keys()
    for name, keep in masks.masks.items():
        assert (ours[f"{name}.weight"][~keep] == 0).all(), name
    base = merged_weights(one_process_run / "prune")  # the pruned model before training
    moved = max(float((theirs[k] - base[k]).abs().max()) for k in theirs)
    assert moved > 1e-3, "training must change the weights, or the comparison proves nothing"
    for key in theirs:  # 1e-4 of the tensor's largest weight: ~175× the DDP difference measured (docstring)
        scale = float(theirs[key].abs().max()) or 1.0
        assert float((ours[key] - theirs[key]).abs().max()) <= 1e-4 * scale, key
    assert_compressed_copy_is_the_model(tmp_path / "run")  # the compressed export after DDP and ZeRO-2/3 runs
    if config == "deepspeed_zero3.yaml":  # the base really was sharded: each rank held half of it
        assert "[dlp] ZeRO-3: rank 0 holds" in result.stdout and "(50%)" in result.stdout


@needs_deepspeed
def test_4bit_base_under_zero3_is_refused_before_any_work(tiny_model_dir, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, max_steps=2, load_in_4bit=True)
    result = launch("deepspeed_zero3.yaml", recipe, tmp_path / "run")
    assert result.returncode != 0  # each rank exits 2 with one line; the launcher then reports the failed ranks
    assert "error: load_in_4bit is not supported under ZeRO-3" in result.stderr
    assert not (tmp_path / "run" / "prune").exists()


def _compare_masks(rank: int, digests: list[str], port: int, results: str) -> None:
    from types import SimpleNamespace

    from dlp.distributed import check_same_masks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(digests))
    try:
        check_same_masks(digests[rank], SimpleNamespace(num_processes=len(digests)))
        outcome = "ok"
    except DlpError as exc:
        outcome = str(exc)
    finally:
        dist.destroy_process_group()
    Path(results, f"rank{rank}.txt").write_text(outcome)


@pytest.mark.parametrize(
    "digests, expected",
    [
        (["a" * 64, "a" * 64], "ok"),
        (["a" * 64, "b" * 64], "masks: rank 1 holds masks bbbbbbbbbbbb… but rank 0 holds aaaaaaaaaaaa…"),
    ],
)
def test_ranks_with_different_masks_all_fail(digests, expected, tmp_path):
    port = 29600 + os.getpid() % 300
    mp.spawn(_compare_masks, args=(digests, port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith(expected)


@needs_deepspeed
def test_sliced_model_trains_under_zero3_as_in_one_process(tiny_model_dir, tmp_path):
    """The sliced architecture (dlp's own model class) is sharded by ZeRO-3 and trains to the 1-process model."""
    slicing = dict(
        method="slice", slicing=0.25, slicing_allocation="lr", slicing_multiple=1, max_steps=STEPS, save_steps=3
    )
    one = write_recipe(tmp_path / "one.yaml", tiny_model_dir, per_device_train_batch_size=GLOBAL_BATCH, **slicing)
    result = run([sys.executable, str(SCRIPT), "--config", str(one), "--output_dir", str(tmp_path / "one")])
    assert result.returncode == 0, result.stderr[-3000:]
    two = write_recipe(tmp_path / "two.yaml", tiny_model_dir, per_device_train_batch_size=GLOBAL_BATCH // 2, **slicing)
    result = launch("deepspeed_zero3.yaml", two, tmp_path / "two")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert "(50%)" in result.stdout
    ours, theirs = merged_weights(tmp_path / "two"), merged_weights(tmp_path / "one")
    base = merged_weights(tmp_path / "one" / "slice")
    assert ours.keys() == theirs.keys() == base.keys()
    assert max(float((theirs[k] - base[k]).abs().max()) for k in theirs) > 1e-3
    for key in theirs:
        assert float((ours[key] - theirs[key]).abs().max()) <= 1e-4 * (float(theirs[key].abs().max()) or 1.0), key
