"""Compress a pruned model directory into a sparse export (mask bits + kept values).

    python train/compress.py --model_dir RUN/model [--output_dir RUN/model-sparse] [--export_values int8]

The input is a dense dlp export (the pipeline's ``model/``, with ``masks.safetensors`` inside, or a
``train/prune.py`` run's ``model/``, with it beside); the output loads without dlp with
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``. This is also how a run finished with
``export_sparse: false`` gets its sparse copy.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, too

from dlp.cli import run_cli  # noqa: E402
from dlp.compress import checkpoint_sizes, compressed_dir, export_compressed  # noqa: E402
from dlp.config import SparseValuesArguments, parse_config  # noqa: E402
from dlp.errors import require  # noqa: E402
from dlp.masks import MaskSet, masks_of_model  # noqa: E402
from dlp.modeling import load_model_and_tokenizer  # noqa: E402
from dlp.rundir import check_writable_dir  # noqa: E402


@dataclass
class CompressArguments:
    model_dir: str = field(metadata={"help": "A pruned model directory (a dlp export, e.g. RUN/model)."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where to write it (default: MODEL_DIR-sparse, e.g. RUN/model-sparse)."}
    )
    masks: str | None = field(
        default=None, metadata={"help": "masks.safetensors (default: inside model_dir, else beside it)."}
    )
    force: bool = field(
        default=False, metadata={"help": "Masks made for another model kind: warn instead of refusing."}
    )


def main(argv: list[str] | None = None) -> dict:
    args, export = parse_config([CompressArguments, SparseValuesArguments], argv)
    output_dir = args.output_dir or str(compressed_dir(args.model_dir.rstrip("/")))
    check_writable_dir(output_dir)  # before anything is loaded: never a directory of the user's
    masks_path = args.masks or str(masks_of_model(args.model_dir))
    require(os.path.isfile(masks_path), f"masks: file not found: {masks_path} (pass --masks)")
    masks = MaskSet.load(masks_path, force=args.force)
    model, tokenizer = load_model_and_tokenizer(args.model_dir, "auto")
    export_compressed(model, tokenizer, masks, output_dir, export.export_values, export.export_group_size)
    sizes = checkpoint_sizes(output_dir)
    print(
        f"[dlp] compressed {args.model_dir} into {output_dir} ({export.export_values} values): pruned projections "
        f"{sizes['projection_ratio']:.3f}x their bf16 size, weight file {sizes['file_ratio']:.3f}x the model's in "
        "bf16; loads with trust_remote_code=True"
    )
    return sizes


if __name__ == "__main__":
    run_cli(main)
