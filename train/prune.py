"""Prune a causal LM with a layerwise sparsity allocation and save masks, pruned model and report.

python train/prune.py --config recipes/smollm2-135m/dlp_wanda_70.yaml [--field value ...]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, too

from dlp.cli import perplexity_change, run_cli  # noqa: E402
from dlp.config import (
    CalibrationArguments,
    EvalArguments,
    ExportArguments,
    PruneArguments,
    RunArguments,
    check_no_training_quantization,
    parse_config,
)  # noqa: E402
from dlp.modeling import DEMO_MODEL  # noqa: E402
from dlp.stages.prune_stage import run_prune  # noqa: E402
from trl import ModelConfig  # noqa: E402  (after dlp, which quiets library noise at import)


def main(argv: list[str] | None = None) -> dict:
    model_args, calib_args, prune_args, eval_args, run_args, export = parse_config(
        [ModelConfig, CalibrationArguments, PruneArguments, EvalArguments, RunArguments, ExportArguments], argv
    )
    model_args.model_name_or_path = model_args.model_name_or_path or DEMO_MODEL
    check_no_training_quantization(model_args, "train/prune.py")
    report = run_prune(model_args, calib_args.seeded(run_args.seed), prune_args, eval_args, run_args, export).to_dict()
    ppl = report["perplexity"]
    print(
        f"[dlp] sparsity {100 * report['sparsity']['overall']:.2f}% | perplexity "
        f"{perplexity_change(ppl, 'dense', 'pruned')}"
    )
    models = ("model/, model-sparse/" if report.get("sparse_export") else "model/") if run_args.save_model else ""
    files = ["masks.safetensors", models, "report.json", "summary.md", "sparsity.png"]
    print(f"[dlp] results in {run_args.output_dir}: {', '.join(f for f in files if f)}")
    return report


if __name__ == "__main__":
    run_cli(main)
