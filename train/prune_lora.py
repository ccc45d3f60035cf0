"""Prune a causal LM, fine-tune mask-exact LoRA adapters on the fixed masks, merge, export and evaluate
(or, with ``method: slice``, rotate and slice it and fine-tune LoRA on the smaller dense model).

    accelerate launch train/prune_lora.py --config recipes/smollm2-135m/dlp_wanda_70_lora.yaml [--field value ...]
    accelerate launch --config_file accelerate_configs/ddp.yaml train/prune_lora.py --config ...

Every stage resumes: rerun the same command after an interruption. ``--overwrite true`` starts over.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, too

from dlp.cli import run_cli  # noqa: E402
from dlp.config import EvalArguments, FinetuneArguments, PruneArguments, SliceArguments, parse_config  # noqa: E402
from dlp.modeling import DEMO_MODEL  # noqa: E402
from dlp.pipeline import run_prune_lora  # noqa: E402
from dlp.runtime import use_cpu_without_accelerator  # noqa: E402
from trl import ModelConfig, SFTConfig  # noqa: E402  (after dlp, which quiets library noise at import)


def main(argv: list[str] | None = None) -> dict:
    launch_defaults = use_cpu_without_accelerator()
    model_args, prune_args, slice_args, eval_args, ft_args, sft_args = parse_config(
        [ModelConfig, PruneArguments, SliceArguments, EvalArguments, FinetuneArguments, SFTConfig], argv, launch_defaults)
    model_args.model_name_or_path = model_args.model_name_or_path or DEMO_MODEL
    report = run_prune_lora(model_args, prune_args, eval_args, ft_args, sft_args, slice_args)
    if int(os.environ.get("RANK", "0")) != 0:
        return report  # the result lines once, from the main process
    ppl = " → ".join(f"{name} {entry['value']:.2f}" for name, entry in report["perplexity"].items() if entry)
    shrink = (f"sliced {100 * report['slicing']['mean_fraction']:.2f}% of the width" if report.get("method") == "slice"
              else f"sparsity {100 * report['sparsity']['overall']:.2f}%")
    print(f"[dlp] {shrink} | perplexity {ppl}")
    loads = "trust_remote_code=True" if report.get("method") == "slice" else "loads with transformers"
    print(f"[dlp] results in {sft_args.output_dir}: model/ (merged, {loads}), report.json, summary.md")
    return report


if __name__ == "__main__":
    run_cli(main)
