"""Compress a causal LM (prune with fixed masks, or ``method: slice``: rotate and slice), fine-tune LoRA adapters
on it (mask-exact on a pruned model), merge, export and evaluate.

    accelerate launch train/prune_lora.py --config recipes/smollm2-135m/dlp_wanda_70_lora.yaml [--field value ...]
    accelerate launch --config_file accelerate_configs/ddp.yaml train/prune_lora.py --config ...

Every stage resumes: rerun the same command after an interruption. ``--overwrite true`` starts over.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, too

from dlp.cli import run_cli  # noqa: E402
from dlp.config import (  # noqa: E402
    CalibrationArguments,
    ChatArguments,
    DistillationArguments,
    EvalArguments,
    FinetuneArguments,
    RunArguments,
    parse_config,
)
from dlp.modeling import DEMO_MODEL  # noqa: E402
from dlp.pipeline import run_prune_lora  # noqa: E402
from dlp.process import use_cpu_without_accelerator  # noqa: E402
from dlp.stages import METHODS  # noqa: E402
from trl import ModelConfig, SFTConfig  # noqa: E402  (after dlp, which quiets library noise at import)


def main(argv: list[str] | None = None) -> dict:
    # trl's SFTConfig seeds with 42; dlp's scripts all default to 0, so the prune stage here gives train/prune.py's
    # masks for the same calibration flags
    launch_defaults = [*use_cpu_without_accelerator(), ("--seed", str(RunArguments.seed), "")]
    method_types = [method.arguments for method in METHODS.values()]  # every method's fields: recipe keys are flat
    types = [ModelConfig, CalibrationArguments, *method_types, EvalArguments, FinetuneArguments]
    model_args, calib_args, *method_values, eval_args, ft_args, distill_args, chat_args, sft_args = parse_config(
        [*types, DistillationArguments, ChatArguments, SFTConfig],
        argv,
        launch_defaults,
    )
    model_args.model_name_or_path = model_args.model_name_or_path or DEMO_MODEL
    method_args = dict(zip(METHODS, method_values))
    report = run_prune_lora(
        model_args, calib_args, method_args, eval_args, ft_args, sft_args, distill_args, chat_args
    ).to_dict()
    if int(os.environ.get("RANK", "0")) != 0:
        return report  # the result lines once, from the main process
    ppl = " → ".join(f"{name} {entry['value']:.2f}" for name, entry in report["perplexity"].items() if entry)
    method = METHODS[report["method"]]
    print(f"[dlp] {method.headline(report)} | perplexity {ppl}")
    print(f"[dlp] results in {sft_args.output_dir}: {', '.join(_exports(method, ft_args))}, report.json, summary.md")
    return report


def _exports(method, ft_args) -> list[str]:
    """The result line's export directories, each with how it loads."""
    if not (method.compressible and ft_args.export_sparse):
        loads = "trust_remote_code=True" if method.trust_remote_code else "loads with transformers"
        return [f"model/ (merged, {loads})"]
    compressed = "mask bits + kept values, trust_remote_code=True"
    if not ft_args.export_dense:
        return [f"model/ (merged, {compressed})"]
    return ["model/ (merged, loads with transformers)", f"model-sparse/ ({compressed})"]


if __name__ == "__main__":
    run_cli(main)
