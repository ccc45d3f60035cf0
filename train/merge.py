"""Merge a mask-exact LoRA adapter into its pruned base model and export a plain Hugging Face directory.

    python train/merge.py --base_dir RUN/prune/model --adapter_dir RUN/adapter --masks RUN/prune/masks.safetensors \\
        --output_dir merged/

The result is W' = (W + s·B·A) ⊙ M for every adapted projection: pruned weights stay exactly zero (a plain peft
``merge_and_unload`` would fill them in). The output loads with ``AutoModelForCausalLM.from_pretrained``; with
``--export_sparse true`` (the default) a sparse copy (mask bits + kept values, ``trust_remote_code=True``) goes to
``OUTPUT_DIR-sparse``; with ``--export_dense false`` the output itself is the sparse one.

An adapter trained on a 4-bit base (QLoRA) merges into the full-precision pruned weights by default
(``--merge_base full``: no quantization error in the exported weights); ``--merge_base dequantized`` merges
into the 4-bit weights it was trained on, dequantized (the adapter's ``quantization.json`` says how), which
reproduces the trained model exactly.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, too

from dlp.cli import run_cli  # noqa: E402
from dlp.compress import compressed_dir, export_formats  # noqa: E402
from dlp.config import MERGE_BASES, ExportArguments, parse_config, require_choice  # noqa: E402
from dlp.data import load_training_windows  # noqa: E402
from dlp.errors import require  # noqa: E402
from dlp.rundir import check_writable_dir  # noqa: E402
from dlp.masks import MaskSet  # noqa: E402
from dlp.merge import load_adapter_model, merge_masked  # noqa: E402


@dataclass
class MergeArguments:
    base_dir: str = field(metadata={"help": "The pruned base model directory (e.g. RUN/prune/model)."})
    adapter_dir: str = field(metadata={"help": "The adapter directory (e.g. RUN/adapter or a checkpoint)."})
    output_dir: str = field(metadata={"help": "Where to write the merged model."})
    masks: str | None = field(default=None, metadata={"help": "masks.safetensors (default: beside base_dir)."})
    dtype: str = field(
        default="float32", metadata={"help": "Load and merge in this dtype: float32, bfloat16, float16."}
    )
    merge_base: str = field(
        default="full",
        metadata={
            "help": f"QLoRA adapters: merge into the full-precision pruned weights or the dequantized 4-bit ones: "
            f"{', '.join(MERGE_BASES)}."
        },
    )
    probe_data: str | None = field(
        default="builtin:wikitext2-valid",
        metadata={"help": "Text whose first windows check merged vs adapter logits; empty to skip the check."},
    )

    force: bool = field(
        default=False,
        metadata={
            "help": "Merge an adapter that records other masks or another base model than the ones given, or masks "
            "whose metadata was edited by hand (a warning instead of an error)."
        },
    )

    def __post_init__(self) -> None:
        require_choice("merge_base", self.merge_base, MERGE_BASES)


def main(argv: list[str] | None = None):
    args, export = parse_config([MergeArguments, ExportArguments], argv)
    check_writable_dir(args.output_dir)  # before anything is loaded: never a directory of the user's
    if export.export_dense and export.export_sparse:
        check_writable_dir(str(compressed_dir(args.output_dir.rstrip("/"))))
    masks_path = args.masks or os.path.join(os.path.dirname(os.path.abspath(args.base_dir)), "masks.safetensors")
    require(os.path.isfile(masks_path), f"masks: file not found: {masks_path} (pass --masks)")
    masks = MaskSet.load(masks_path, force=args.force)
    model, tokenizer = load_adapter_model(
        args.base_dir, args.adapter_dir, masks, args.dtype, args.merge_base, args.force
    )
    probe = load_training_windows(tokenizer, args.probe_data, 128, max_windows=2) if args.probe_data else None
    merged, check = merge_masked(model, masks, probe)
    written = export_formats(merged, tokenizer, masks, args.output_dir.rstrip("/"), export)
    print(
        f"[dlp] merged {check.lora_layers} mask-exact LoRA layers into {', '.join(map(str, written))}: "
        f"{check.violations} nonzero pruned weights, max |Δlogit| {check.max_logit_diff}"
    )
    return check


if __name__ == "__main__":
    run_cli(main)
