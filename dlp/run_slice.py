"""The slice stage: calibration → (Layer Redundancy scores) → per-layer widths → rotated and sliced model → report.

Artifacts in ``output_dir``, each written atomically: ``layer_scores.json`` (the dense scoring sweep, shared with
pruning and keyed the same way), ``model/`` (the sliced model with its own modeling file, loadable with
``trust_remote_code=True``) with ``slicing.json`` beside it (the widths and what produced them: a rerun with the
same recipe and data reuses the model), then ``report.json``, ``summary.md`` and ``widths.png``; ``report.json``
comes last and marks the stage finished.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import EvalArguments, PruneArguments, RunArguments, SliceArguments
from .data import load_calibration
from .evaluate import perplexity
from .io import atomic_write_json, read_json
from .merge import export_model
from .modeling import find_decoder_layers
from .report import write_slice_report
from .run_prune import check_run_inputs, dense_layer_scores, finished_run, prepare_run, reload_matching
from .preflight import check_lengths, inspect_model
from .slicing import (check_sliceable, check_sliceable_type, check_slicing_mean, parameter_count, slice_model,
                      sliced_widths, slicing_fractions)

SLICING_FILE = "slicing.json"
CALIBRATION_FIELDS = ("calibration_data", "calibration_split", "nsamples", "seqlen", "calibration_batch_size", "device")


def run_slice(model_args, prune_args: PruneArguments, slice_args: SliceArguments, eval_args: EvalArguments,
              run_args: RunArguments) -> dict[str, Any]:
    """Slice ``model_args.model_name_or_path`` as configured; return the report (also written to output_dir)."""
    out = Path(run_args.output_dir)
    finished = finished_run(run_args, lambda: check_slice_settings(model_args, prune_args, eval_args))
    if finished is not None:
        return finished
    model, tokenizer, device = prepare_run(model_args, prune_args, run_args)
    model_id = model_args.model_name_or_path
    check_sliceable(model)
    calib = load_calibration(tokenizer, prune_args.calibration_data, prune_args.nsamples, prune_args.seqlen,
                             run_args.seed, prune_args.calibration_split)
    ppl_kwargs = dict(seqlen=eval_args.eval_seqlen, max_windows=eval_args.max_windows,
                      batch_size=eval_args.eval_batch_size, device=device)
    config = {**{name: getattr(prune_args, name) for name in CALIBRATION_FIELDS}, **asdict(slice_args),
              **asdict(run_args)}
    report: dict[str, Any] = {"model": model_id, "config": config, "perplexity": {}, "timings": {}}
    if eval_args.eval_dense:
        report["perplexity"]["dense"] = perplexity(model, tokenizer, eval_args.eval_data, **ppl_kwargs).to_dict()
        print(f"[dlp] dense perplexity {report['perplexity']['dense']['value']:.2f}")

    _, layers = find_decoder_layers(model)
    redundancy = None
    if slice_args.slicing_allocation == "lr":
        start = time.perf_counter()
        redundancy = [s.redundancy for s in dense_layer_scores(out, model, model_args, prune_args, calib, device)]
        report["timings"]["score_s"] = time.perf_counter() - start
    fractions = slicing_fractions(slice_args.slicing_allocation, slice_args.slicing, len(layers), redundancy,
                                  slice_args.slicing_spread)
    widths = sliced_widths(fractions, model.config.hidden_size, slice_args.slicing_multiple)
    check_slicing_mean(widths, model.config.hidden_size, slice_args.slicing, slice_args.slicing_multiple)
    print("[dlp] sliced widths: " + " ".join(str(w) for w in widths))

    metadata = {"model": model_id, "recipe": config, "widths": widths, "seed": run_args.seed,
                "calibration_sha256": calib.sha256}
    start = time.perf_counter()
    sliced = reload_matching(out / "model", read_json(out / SLICING_FILE), metadata, model_args, "slicing")
    if sliced is None:
        sliced = slice_model(model, calib.input_ids, widths, device=device,
                             batch_size=prune_args.calibration_batch_size)
        export_model(sliced, tokenizer, None, out / "model")  # with its modeling file
        atomic_write_json(out / SLICING_FILE, metadata)
    report["timings"]["slice_s"] = time.perf_counter() - start
    report["perplexity"]["sliced"] = perplexity(sliced, tokenizer, eval_args.eval_data, **ppl_kwargs).to_dict()
    print(f"[dlp] sliced perplexity {report['perplexity']['sliced']['value']:.2f}")
    report["slicing"] = _slicing_summary(model, sliced, fractions, widths, redundancy)
    report["calibration_sha256"] = calib.sha256
    write_slice_report(out, report)
    return report


def check_slice_settings(model_args, prune_args: PruneArguments, eval_args: EvalArguments, **lengths: int) -> None:
    """What a slice recipe can be checked for against the model's config alone (see preflight.py)."""
    plan = inspect_model(model_args.model_name_or_path)
    check_sliceable_type(plan.model_type)
    check_lengths(plan, seqlen=prune_args.seqlen, eval_seqlen=eval_args.eval_seqlen, **lengths)
    check_run_inputs(prune_args, eval_args)


def _slicing_summary(dense, sliced, fractions: list[float], widths: list[int], redundancy) -> dict[str, Any]:
    hidden = dense.config.hidden_size
    dense_params, sliced_params = parameter_count(dense), parameter_count(sliced)
    dense_blocks, sliced_blocks = parameter_count(dense, embeddings=False), parameter_count(sliced, embeddings=False)
    return {
        "hidden_size": hidden,
        "fractions": fractions,
        "widths": widths,
        "measured_fractions": [1.0 - w / hidden for w in widths],
        "mean_fraction": 1.0 - sum(widths) / (hidden * len(widths)),
        "redundancy": redundancy,
        "parameters": {"dense": dense_params, "sliced": sliced_params, "ratio": sliced_params / dense_params,
                       "dense_without_embeddings": dense_blocks, "sliced_without_embeddings": sliced_blocks,
                       "ratio_without_embeddings": sliced_blocks / dense_blocks},
    }
