"""Every shipped recipe parses into its entry script's arguments (a typo in a recipe is a user's first error)."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO

CHECK = """
import sys
from pathlib import Path
from trl import ModelConfig, SFTConfig
from dlp.config import (CalibrationArguments, ChatArguments, DistillationArguments, EvalArguments, FinetuneArguments,
                        PruneArguments, RunArguments, SliceArguments, parse_config)
from dlp.quantize import bnb_config
for recipe in sorted(Path("recipes").glob("*/*.yaml")):
    finetunes = "lora" in recipe.stem  # train/prune_lora.py (which takes every method's fields)
    slices = "_slice_" in recipe.stem  # train/slice.py; other recipes are train/prune.py's
    methods = [PruneArguments, SliceArguments] if finetunes else [SliceArguments] if slices else [PruneArguments]
    types = [ModelConfig, CalibrationArguments, *methods, EvalArguments] \
        + ([FinetuneArguments, DistillationArguments, ChatArguments, SFTConfig] if finetunes else [RunArguments])
    # bf16 recipes are GPU recipes: parse them with bf16 off so this CPU can build the training arguments
    gpu_off = ["--bf16", "false"] if finetunes else []
    parsed = parse_config(types, ["--config", str(recipe), "--output_dir", "/tmp/unused"] + gpu_off)
    model_args = parsed[0]
    if model_args.load_in_4bit:
        assert bnb_config(model_args).bnb_4bit_quant_type == "nf4", recipe
    print("ok", recipe)
"""


def test_every_recipe_parses():
    result = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    parsed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")}
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "recipes").glob("*/*.yaml")}
    assert parsed == shipped and len(shipped) >= 12
