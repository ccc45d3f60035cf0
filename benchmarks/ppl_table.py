"""Perplexity of SmolLM2-135M pruned by every allocation/criterion, in one run (dense sweep shared).

    python benchmarks/ppl_table.py [--methods uniform,owl,...] [--out benchmarks/results/ppl_table.json]

Protocol (DEVELOPERS.md): 32×512 calibration windows of WikiText-2 valid, perplexity on the first 64 windows of
512 tokens of the WikiText-2 raw test split. The dense scoring sweep runs once and serves every allocator.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from dlp.config import PruneArguments  # noqa: E402
from dlp.data import load_calibration  # noqa: E402
from dlp.evaluate import eval_stream, perplexity  # noqa: E402
from dlp.rundir import atomic_write_json, read_json  # noqa: E402
from dlp.criteria import PruneSpec, parse_pattern  # noqa: E402
from dlp.pruner import layer_param_counts, prune_model  # noqa: E402
from dlp.scoring import score_layers  # noqa: E402
from dlp.modeling import DEMO_MODEL, load_model_and_tokenizer  # noqa: E402
from dlp.allocators import compute_sparsities  # noqa: E402
from dlp.process import setup  # noqa: E402

METHODS = {  # name -> PruneArguments overrides
    "uniform (Wanda)": dict(allocation="uniform"),
    "OWL (Wanda)": dict(allocation="owl"),
    "DLP-median (Wanda)": dict(allocation="dlp", dlp_statistic="median"),
    "DLP-mean (Wanda)": dict(allocation="dlp", dlp_statistic="mean"),
    "LR (Wanda)": dict(allocation="lr"),
    "uniform (SparseGPT)": dict(allocation="uniform", criterion="sparsegpt"),
    "DLP-median (SparseGPT)": dict(allocation="dlp", criterion="sparsegpt"),
    "2:4 uniform (Wanda) 50%": dict(allocation="uniform", pattern="2:4", sparsity=0.5),
    "DLP-median α=0.10 (Wanda)": dict(allocation="dlp", dlp_alpha=0.10),
    "DLP-median α=0.20 (Wanda)": dict(allocation="dlp", dlp_alpha=0.20),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--sparsity", type=float, default=0.7)
    choices = ", ".join(METHODS).replace("%", "%%")  # argparse formats help with %
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + choices)
    parser.add_argument("--calibration_data", default="builtin:wikitext2-valid")
    parser.add_argument("--eval_data", default="builtin:wikitext2-test")
    parser.add_argument("--out", default="benchmarks/results/ppl_table.json")
    parser.add_argument("--merge", action="store_true", help="keep rows already in --out that this run does not redo")
    args = parser.parse_args()
    setup(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = load_calibration(tokenizer, args.calibration_data, 32, 512, seed=0)
    stream = eval_stream(tokenizer, args.eval_data)
    previous = (read_json(args.out) or {}).get("rows", {}) if args.merge else {}
    rows = {**previous, "dense": {"ppl": perplexity(model, tokenizer, args.eval_data, 512, 64, stream=stream).value}}
    result = {
        "model": args.model,
        "calibration": f"32x512 {args.calibration_data} seed 0 sha256 {calib.sha256}",
        "evaluation": f"first 64 windows x 512 tokens of {args.eval_data}",
        "rows": rows,
    }
    print(f"dense: {rows['dense']['ppl']:.2f}", flush=True)
    scores = score_layers(model, calib.input_ids)
    params = layer_param_counts(model)
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if name not in METHODS:
            raise SystemExit(f"error: unknown method {name!r}; choose from: {', '.join(METHODS)}")
        cfg = PruneArguments(**{"sparsity": args.sparsity, **METHODS[name]})
        model.load_state_dict(dense_state)
        sparsities = compute_sparsities(cfg, scores, params)
        start = time.perf_counter()
        masks = prune_model(model, calib.input_ids, sparsities, PruneSpec(cfg.criterion, parse_pattern(cfg.pattern)))
        seconds = time.perf_counter() - start
        ppl = perplexity(model, tokenizer, args.eval_data, 512, 64, stream=stream).value
        rows[name] = {
            "ppl": ppl,
            "sparsity": masks.sparsity_report()["overall"],
            "prune_s": seconds,
            "layer_sparsities": sparsities,
            "masks_digest": masks.digest(),
        }
        print(
            f"{name}: ppl {ppl:.2f}, sparsity {100 * rows[name]['sparsity']:.2f}%, pruned in {seconds:.0f} s",
            flush=True,
        )
        atomic_write_json(args.out, result)  # after every row: a long run keeps what it measured
    print("\n| method | sparsity | perplexity |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {100 * row.get('sparsity', 0):.2f}% | {row['ppl']:.2f} |")


if __name__ == "__main__":
    main()
