"""Perplexity along the QLoRA path, from a finished QLoRA run: pruned fp32 → pruned NF4 → after QLoRA, merged
into the fp32 pruned weights and into the dequantized NF4 weights → re-quantized export; beside the 16-bit LoRA
run of the same recipe when given.

    python benchmarks/qlora_ppl.py --run outputs/smollm2-135m/dlp_wanda_70_qlora \\
        --lora_run outputs/smollm2-135m/dlp_wanda_70_lora

The run's own report already holds every figure but the dequantized merge (the pipeline exports one merge, the
recipe's ``merge_base``); this script merges the other way and evaluates it with the run's protocol.
Results: ``benchmarks/results/qlora_ppl.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dlp.evaluate import perplexity  # noqa: E402
from dlp.rundir import atomic_write_json, read_json  # noqa: E402
from dlp.masks import MaskSet  # noqa: E402
from dlp.merge import load_adapter_model, merge_masked  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "qlora_ppl.json"


def other_merge_perplexity(run: Path, report: dict) -> dict:
    cfg = report["config"]
    other = "dequantized" if report["merge"].get("merge_base", "full") == "full" else "full"
    prune_dir = Path(cfg.get("prune_dir") or run / "prune")
    masks = MaskSet.load(prune_dir / "masks.safetensors")
    model, tokenizer = load_adapter_model(prune_dir / "model", run / "adapter", masks, merge_base=other)
    merged, check = merge_masked(model, masks)
    ppl = perplexity(
        merged.eval(),
        tokenizer,
        cfg["eval_data"],
        seqlen=cfg["eval_seqlen"],
        max_windows=cfg["eval_max_windows"] or None,
        batch_size=cfg["eval_batch_size"],
    )
    print(f"merged into the {other} base: {ppl} ({check.violations} nonzero pruned weights)")
    return {"merge_base": other, "perplexity": ppl.to_dict(), "violations": check.violations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="outputs/smollm2-135m/dlp_wanda_70_qlora")
    parser.add_argument("--lora_run", default=None, help="The 16-bit LoRA run of the same recipe, for comparison.")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    run = Path(args.run)
    report = read_json(run / "report.json")
    if report is None or report.get("quantization") is None:
        sys.exit(f"error: run: {run} is not a finished load_in_4bit run (no report.json with a quantization entry)")
    other = other_merge_perplexity(run, report)
    ppl = {name: entry["value"] for name, entry in report["perplexity"].items() if entry}
    merged_as = report["merge"].get("merge_base", "full")
    table = {
        "pruned (fp32)": ppl["pruned"],
        "pruned, 4-bit NF4": ppl["pruned_4bit"],
        f"QLoRA, merged into {merged_as}": ppl["finetuned"],
        f"QLoRA, merged into {other['merge_base']}": other["perplexity"]["value"],
        "QLoRA, merged (full) and re-quantized to NF4": ppl.get("finetuned_4bit"),
    }
    lora = read_json(Path(args.lora_run) / "report.json") if args.lora_run else None
    if lora is not None:
        table["LoRA of the same recipe on the fp32 base"] = lora["perplexity"]["finetuned"]["value"]
    for name, value in table.items():
        print(f"{name:50s} {value:.2f}" if value is not None else f"{name:50s} -")
    if not args.no_save:
        atomic_write_json(
            RESULTS,
            {
                "run": str(run),
                "lora_run": args.lora_run,
                "table": table,
                "other_merge": other,
                "quantization": report["quantization"],
                "training": report["training"],
            },
        )


if __name__ == "__main__":
    main()
