"""Rotate and slice a Llama-architecture causal LM (SliceGPT; Dynamic Slicing's Layer-Redundancy widths).

    python train/slice.py --config recipes/smollm2-135m/lr_slice_25.yaml [--field value ...]

The sliced model in ``<output_dir>/model`` loads without dlp:
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, too

from dlp.cli import perplexity_change, run_cli  # noqa: E402
from dlp.config import (  # noqa: E402
    CalibrationArguments,
    EvalArguments,
    RunArguments,
    SliceArguments,
    check_no_training_quantization,
    parse_config,
)
from dlp.modeling import DEMO_MODEL  # noqa: E402
from dlp.stages.slice_stage import run_slice  # noqa: E402
from trl import ModelConfig  # noqa: E402  (after dlp, which quiets library noise at import)


def main(argv: list[str] | None = None) -> dict:
    model_args, calib_args, slice_args, eval_args, run_args = parse_config(
        [ModelConfig, CalibrationArguments, SliceArguments, EvalArguments, RunArguments], argv
    )
    model_args.model_name_or_path = model_args.model_name_or_path or DEMO_MODEL
    check_no_training_quantization(model_args, "train/slice.py")
    report = run_slice(model_args, calib_args.seeded(run_args.seed), slice_args, eval_args, run_args).to_dict()
    ppl, slicing = report["perplexity"], report["slicing"]
    print(
        f"[dlp] sliced {100 * slicing['mean_fraction']:.2f}% of the width, parameters "
        f"{slicing['parameters']['ratio']:.3f}× | perplexity {perplexity_change(ppl, 'dense', 'sliced')}"
    )
    print(
        f"[dlp] results in {run_args.output_dir}: model/ (trust_remote_code=True), report.json, summary.md, widths.png"
    )
    return report


if __name__ == "__main__":
    run_cli(main)
