"""Masks digests of many prune recipes on tiny random models, from one checkout or two side by side.

A restructuring must not change which weights a recipe prunes. This runs ``train/prune.py`` of each checkout on the
same tiny models, calibration text and recipes (every allocation, criterion, pattern and prune mode, three model
families) and prints the masks digest of each run; with ``--against`` it runs an older checkout too and reports
any recipe whose digest differs.

    python benchmarks/mask_digests.py                          # this checkout
    python benchmarks/mask_digests.py --against /tmp/old-checkout --json digests.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

BASE = [
    "--sparsity",
    "0.6",
    "--nsamples",
    "4",
    "--seqlen",
    "64",
    "--eval_dense",
    "false",
    "--eval_seqlen",
    "64",
    "--eval_max_windows",
    "1",
    "--device",
    "cpu",
    "--save_model",
    "false",
]
RECIPES = {  # name -> (model family, extra flags)
    "dlp-median-wanda": ("llama", []),
    "dlp-mean-wanda": ("llama", ["--dlp_statistic", "mean"]),
    "uniform-wanda": ("llama", ["--allocation", "uniform"]),
    "owl-wanda": ("llama", ["--allocation", "owl"]),
    "lr-wanda": ("llama", ["--allocation", "lr"]),
    "explicit-wanda": ("llama", ["--allocation", "explicit", "--layer_sparsities", "0.5,0.6,0.7"]),
    "dlp-magnitude": ("llama", ["--criterion", "magnitude"]),
    "dlp-sparsegpt": ("llama", ["--criterion", "sparsegpt"]),
    "dlp-sparsegpt-onepass": ("llama", ["--criterion", "sparsegpt", "--prune_mode", "onepass"]),
    "dlp-wanda-fast": ("llama", ["--prune_mode", "fast"]),
    "dlp-wanda-onepass": ("llama", ["--prune_mode", "onepass"]),
    "uniform-wanda-2of4": ("llama", ["--allocation", "uniform", "--pattern", "2:4", "--sparsity", "0.5"]),
    "uniform-sparsegpt-2of4": (
        "llama",
        ["--allocation", "uniform", "--criterion", "sparsegpt", "--pattern", "2:4", "--sparsity", "0.5"],
    ),
    "gpt2-dlp-wanda": ("gpt2", []),
    "gpt2-dlp-sparsegpt": ("gpt2", ["--criterion", "sparsegpt"]),
    "opt-owl-wanda": ("opt", ["--allocation", "owl"]),
}


def digests(checkout: Path, models: dict[str, Path], texts: tuple[str, str], work: Path) -> dict[str, str]:
    """The masks digest of every recipe, from ``checkout``'s own ``train/prune.py`` (and its own dlp package)."""
    results = {}
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    for name, (family, extra) in RECIPES.items():
        out = work / f"{checkout.name}-{name}"
        argv = [
            sys.executable,
            str(checkout / "train" / "prune.py"),
            "--config",
            str(checkout / "recipes" / "smollm2-135m" / "dlp_wanda_70.yaml"),
            "--model_name_or_path",
            str(models[family]),
            "--calibration_data",
            texts[0],
            "--eval_data",
            texts[1],
            *BASE,
            *extra,
            "--output_dir",
            str(out),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            results[name] = "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
        else:
            results[name] = json.loads((out / "report.json").read_text())["masks_digest"]
        print(f"{checkout.name:>12} {name:<24} {results[name][:16]}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another checkout to run side by side")
    parser.add_argument("--json", type=Path, help="also write the digests here")
    args = parser.parse_args()
    from conftest import _text_file, save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = {family: save_tiny_model(work / f"tiny-{family}", family) for family in ("llama", "gpt2", "opt")}
        texts = (_text_file(work, "calib.txt", 0), _text_file(work, "eval.txt", 1))
        table = {"this": digests(REPO, models, texts, work)}
        if args.against:
            table["against"] = digests(args.against.resolve(), models, texts, work)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    if args.against:
        differ = [name for name in RECIPES if table["this"][name] != table["against"][name]]
        print(
            f"{len(RECIPES) - len(differ)} of {len(RECIPES)} recipes give identical masks"
            + (f"; different: {', '.join(differ)}" if differ else "")
        )
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
