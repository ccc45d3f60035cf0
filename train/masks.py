"""Inspect, verify or apply a dlp mask file.

python train/masks.py report  --masks out/masks.safetensors
python train/masks.py verify  --masks out/masks.safetensors --model out/model
python train/masks.py apply   --masks out/masks.safetensors --model some/dense/model --output_dir out/applied
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dlp.cli import one_line_parse_errors, run_cli  # noqa: E402
from dlp.errors import require  # noqa: E402
from dlp.rundir import atomic_dir, check_writable_dir  # noqa: E402
from dlp.masks import MaskSet, zero_fraction  # noqa: E402


# what verify and report say of the metadata a file shows (MaskSet.metadata_check)
METADATA_CHECKS = {
    "ok": "checked (its checksum matches: the model, recipe and layer sparsities are the ones recorded at save)",
    "unchecked": "unchecked (the file was written before dlp recorded a metadata checksum; the bits are checked)",
    "mismatch": "EDITED after it was written (checksum mismatch, read because of --force): do not trust it",
}


def _report(masks: MaskSet, report: dict) -> dict:
    """What ``report`` prints: the recorded metadata beside what the bits themselves measure (overall, per layer
    and per module), and whether the metadata is the one written with the bits."""
    meta = {k: masks.metadata.get(k) for k in ("model", "seed", "calibration_sha256", "layer_sparsities")}
    return {
        "digest": masks.digest(),
        "metadata_check": masks.metadata_check,
        "overall": report["overall"],
        "weights": report["weights"],
        **meta,
        "measured_layer_sparsities": masks.measured_layer_sparsities(),
        "modules": report["modules"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["report", "verify", "apply"])
    parser.add_argument("--masks", required=True, help="a masks.safetensors written by dlp")
    parser.add_argument("--model", help="model id or directory (verify, apply)")
    parser.add_argument("--output_dir", help="where apply saves the masked model (new, empty, or written by dlp)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="apply/verify even if the model is not the kind the "
        "masks were made for (another architecture or layer count, modules without a mask): loudly",
    )
    one_line_parse_errors(parser)
    args = parser.parse_args(argv)
    if args.command == "apply":
        require(args.output_dir is not None, "--output_dir is required for apply")
        check_writable_dir(args.output_dir)  # before the model is loaded
    masks = MaskSet.load(args.masks, force=args.force)
    report = masks.sparsity_report()
    if args.command == "report":
        print(json.dumps(_report(masks, report), indent=2))
        disagreement = masks.layer_sparsity_disagreement()
        if disagreement:  # stdout stays one JSON document
            print(f"warning: masks: {disagreement}", file=sys.stderr)
        return 0
    require(args.model is not None, f"--model is required for {args.command}")
    from dlp.modeling import load_model_and_tokenizer
    from dlp.preflight import check_masks_fit, inspect_model

    if not args.force:  # from the config alone, before the weights load
        shapes = {name: tuple(mask.shape) for name, mask in masks.masks.items()}
        check_masks_fit(inspect_model(args.model), masks.metadata, shapes, "masks", "--model")
    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.command == "verify":
        bad = masks.violations(model)
        print(
            f"{bad} masked weights are non-zero; overall mask sparsity {100 * report['overall']:.2f}%, "
            f"the model's prunable weights are {100 * zero_fraction(model):.2f}% zero"
        )
        print(f"metadata: {METADATA_CHECKS[masks.metadata_check]}")
        disagreement = masks.layer_sparsity_disagreement()
        if disagreement:
            print(f"warning: {disagreement}")
        return 0 if bad == 0 else 1
    masks.apply(model)
    with atomic_dir(args.output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"masked model saved to {args.output_dir}")
    return 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
