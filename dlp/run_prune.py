"""The prune stage: calibration → layer scores → layerwise sparsities → masks → pruned model → report.

Each step writes its artifact atomically into ``output_dir`` and a rerun picks up after the last finished one:
``layer_scores.json`` (dense sweep, keyed by model, data hash and settings), ``masks.safetensors`` and
``model/`` (pruned weights; reused when the masks' metadata — recipe, ratios, seed, data hash — matches), then
``report.json`` (whose presence marks the stage finished; ``--overwrite`` starts over).
"""

from __future__ import annotations

import hashlib
import math
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable


from .allocate import (LayerScores, balance, dlp_sparsities, explicit_sparsities, lr_sparsities, weighted_mean,
                       owl_sparsities)
from .config import EvalArguments, PruneArguments, RunArguments
from .data import check_source, load_calibration
from .errors import ResultCheckFailed
from .evaluate import perplexity, zero_shot
from .io import atomic_dir, atomic_write_json, check_writable_dir, is_dlp_dir, read_json, start_output_dir
from .layerwise import PruneSpec, layer_param_counts, prune_model, score_layers
from .masks import MaskSet, model_fingerprint
from .modeling import find_decoder_layers, load_model_and_tokenizer, prunable_linears
from .preflight import ModelPlan, check_lengths, check_pattern_fits, inspect_model
from .prune import parse_pattern
from .report import layer_sparsity_from_modules, write_report
from .runtime import resolve_device, setup
from .weights import logical_shape

NEEDS_SCORES = ("dlp", "owl", "lr")


def compute_sparsities(args: PruneArguments, scores: list[LayerScores] | None, params: list[int]) -> list[float]:
    """Per-layer sparsities for ``args.allocation``, balanced to the target and clipped (see allocate.py)."""
    num_layers = len(params)
    if args.allocation == "uniform":
        raw = [args.sparsity] * num_layers
    elif args.allocation == "explicit":
        return explicit_sparsities(args.layer_sparsities, num_layers, args.max_layer_sparsity)  # taken as given
    elif args.allocation == "dlp":
        stat = [s.wanda_median if args.dlp_statistic == "median" else s.wanda_mean for s in scores]
        raw = dlp_sparsities(stat, args.sparsity, args.dlp_alpha)
    elif args.allocation == "owl":
        raw = owl_sparsities([s.outlier_ratio for s in scores], args.sparsity, args.owl_lambda)
    else:
        raw = lr_sparsities([s.redundancy for s in scores], args.sparsity, args.lr_spread)
    return balance(raw, params, args.sparsity, args.max_layer_sparsity)


SPARSITY_TOLERANCE = 0.001  # overall sparsity may miss its target by at most 0.1 point (rounding to whole weights)


def check_overall_sparsity(masks: MaskSet, target: float) -> float:
    """The masks' overall sparsity, which must be the target's: a gap means an allocation or a criterion did not do
    what the report would claim, so the run stops with the two numbers instead of saving such masks."""
    overall = masks.sparsity_report()["overall"]
    if abs(overall - target) > SPARSITY_TOLERANCE:
        raise ResultCheckFailed(f"prune: the masks remove {100 * overall:.2f}% of the weights, but the target was "
                                f"{100 * target:.2f}% (more than {100 * SPARSITY_TOLERANCE:.1f} point apart); "
                                "nothing was saved")
    return overall


def cache_key(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def cached_layer_scores(path: Path, key: str, compute) -> list[LayerScores]:
    cached = read_json(path)
    if cached and cached.get("key") == key:
        return [LayerScores(**s) for s in cached["layers"]]
    scores = compute()
    atomic_write_json(path, {"key": key, "layers": [asdict(s) for s in scores]})
    return scores


def dense_layer_scores(out: Path, model, model_args, prune_args: PruneArguments, calib, device,
                       keep_stats: dict | None = None) -> list[LayerScores]:
    """The dense scoring sweep's per-layer scores, cached in ``layer_scores.json`` (keyed by model, dtype,
    calibration data and settings). With ``keep_stats`` the sweep always runs and keeps every Linear's statistics."""
    batch = prune_args.calibration_batch_size
    key = cache_key({"model": model_args.model_name_or_path, "dtype": model_args.dtype, "data": calib.sha256,
                     "owl_m": prune_args.owl_m, "batch": batch})
    compute = lambda: score_layers(model, calib.input_ids, owl_m=prune_args.owl_m, device=device,  # noqa: E731
                                   batch_size=batch, keep_stats=keep_stats)
    return compute() if keep_stats is not None else cached_layer_scores(out / "layer_scores.json", key, compute)


def finished_run(run_args: RunArguments, preflight: Callable[[], object] = lambda: None) -> dict[str, Any] | None:
    """The report of a run already finished in ``output_dir`` (unless ``--overwrite``), or None once ``output_dir``
    is ready for a new run: ``preflight`` (the checks that need no weights) has passed, and only then is anything
    written or removed, so a refused run leaves ``output_dir`` as it found it."""
    out = Path(run_args.output_dir)
    finished = finished_report(out, run_args.overwrite)
    if finished is not None:
        return finished
    preflight()
    start_output_dir(out, run_args.overwrite)
    return None


def finished_report(out: Path, overwrite: bool, announce: bool = True) -> dict[str, Any] | None:
    """The report of a run already finished in the dlp directory ``out`` (None with ``overwrite``); ``out`` must be
    a place dlp may write to either way (checked without writing)."""
    check_writable_dir(out)
    finished = read_json(out / "report.json") if is_dlp_dir(out) and not overwrite else None
    if finished is not None and announce:
        print(f"[dlp] {out} already holds a finished run (report.json); use --overwrite to start over")
    return finished


def check_run_inputs(prune_args: PruneArguments, eval_args: EvalArguments) -> None:
    """The calibration and evaluation texts and the compute device, which prune and slice runs share."""
    check_source(prune_args.calibration_data, "calibration_data")
    check_source(eval_args.eval_data, "eval_data")
    resolve_device(prune_args.device)


def check_prune_settings(model_args, prune_args: PruneArguments, eval_args: EvalArguments, **lengths: int) -> ModelPlan:
    """Everything about a prune recipe that can be checked against the model's config alone (see preflight.py)."""
    plan = inspect_model(model_args.model_name_or_path)
    check_lengths(plan, seqlen=prune_args.seqlen, eval_seqlen=eval_args.eval_seqlen, **lengths)
    if prune_args.allocation == "explicit":
        explicit_sparsities(prune_args.layer_sparsities, plan.num_layers, prune_args.max_layer_sparsity)
    pattern = parse_pattern(prune_args.pattern)
    if pattern.is_nm:
        check_pattern_fits(plan, pattern.m, prune_args.pattern)
    check_run_inputs(prune_args, eval_args)
    return plan


def prepare_run(model_args, prune_args: PruneArguments, run_args: RunArguments):
    """Seeds, the compute device and the dense model with its tokenizer, for a run that is not finished yet."""
    setup(run_args.seed)
    model, tokenizer = load_model_and_tokenizer(model_args.model_name_or_path, model_args.dtype or "float32",
                                                model_args.attn_implementation or "sdpa")
    return model, tokenizer, resolve_device(prune_args.device)


def run_prune(model_args, prune_args: PruneArguments, eval_args: EvalArguments, run_args: RunArguments) -> dict[str, Any]:
    """Prune ``model_args.model_name_or_path`` as configured; return the report (also written to output_dir)."""
    out = Path(run_args.output_dir)
    finished = finished_run(run_args, lambda: check_prune_settings(model_args, prune_args, eval_args))
    if finished is not None:
        return finished
    model, tokenizer, device = prepare_run(model_args, prune_args, run_args)
    model_id = model_args.model_name_or_path
    calib = load_calibration(tokenizer, prune_args.calibration_data, prune_args.nsamples, prune_args.seqlen,
                             run_args.seed, prune_args.calibration_split)
    ppl_kwargs = dict(seqlen=eval_args.eval_seqlen, max_windows=eval_args.max_windows,
                      batch_size=eval_args.eval_batch_size, device=device)
    report: dict[str, Any] = {"model": model_id, "config": {**asdict(prune_args), **asdict(run_args)},
                              "perplexity": {}, "timings": {}}
    if eval_args.eval_dense:
        report["perplexity"]["dense"] = perplexity(model, tokenizer, eval_args.eval_data, **ppl_kwargs).to_dict()
        print(f"[dlp] dense perplexity {report['perplexity']['dense']['value']:.2f}")

    params = layer_param_counts(model)
    scores, stats = None, None
    fast = prune_args.prune_mode == "fast" and prune_args.criterion != "magnitude"
    if prune_args.allocation in NEEDS_SCORES or fast:
        start = time.perf_counter()
        stats = {} if fast else None  # fast mode prunes from this sweep's statistics, so it always runs it
        scores = dense_layer_scores(out, model, model_args, prune_args, calib, device, stats)
        report["timings"]["score_s"] = time.perf_counter() - start
    sparsities = compute_sparsities(prune_args, scores, params)
    target = weighted_mean(sparsities, params)  # = sparsity, except for an explicit list (its own weighted mean)
    report["target_sparsity"] = target
    print("[dlp] layer sparsities: " + " ".join(f"{100 * s:.1f}" for s in sparsities)
          + f" (overall {100 * target:.2f}%)")

    spec = PruneSpec(prune_args.criterion, parse_pattern(prune_args.pattern), prune_args.sparsegpt_blocksize,
                     prune_args.sparsegpt_percdamp)
    metadata = mask_metadata(model, model_id, report["config"], sparsities, run_args.seed, calib.sha256)
    start = time.perf_counter()
    masks, model = _resume_pruned(out, metadata, model, model_args) if run_args.save_model else (None, model)
    if masks is None:
        masks = prune_model(model, calib.input_ids, sparsities, spec, mode=prune_args.prune_mode, device=device,
                            batch_size=prune_args.calibration_batch_size, stats=stats)
        masks.metadata = metadata
        check_overall_sparsity(masks, target)  # before anything is saved: no artifact that contradicts the target
        masks.save(out / "masks.safetensors")
        if run_args.save_model:
            with atomic_dir(out / "model") as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
    report["timings"]["prune_s"] = time.perf_counter() - start
    assert masks.violations(model) == 0, "pruned weights are not all zero"  # an internal invariant, not user input

    _fill_sparsity(report, model, masks, sparsities, scores, calib.sha256)
    report["perplexity"]["pruned"] = perplexity(model, tokenizer, eval_args.eval_data, **ppl_kwargs).to_dict()
    print(f"[dlp] pruned perplexity {report['perplexity']['pruned']['value']:.2f}")
    if eval_args.eval_tasks:
        tasks = [t.strip() for t in eval_args.eval_tasks.split(",") if t.strip()]
        report["zero_shot"] = zero_shot(model, tokenizer, tasks)
    write_report(out, report)
    return report


def mask_metadata(model, model_id: str, config: dict[str, Any], sparsities: list[float], seed: int,
                  calibration_sha256: str) -> dict[str, Any]:
    """What a mask file records of how it was made: the model and its fingerprint, the recipe (not where it was
    written, nor whether to start over: those do not shape the masks, and would make equal masks differ in bytes),
    the per-layer sparsities, the seed and the calibration data's hash."""
    recipe = {key: value for key, value in config.items() if key not in ("output_dir", "overwrite")}
    return {"model": model_id, "fingerprint": model_fingerprint(model), "recipe": recipe,
            "layer_sparsities": sparsities, "seed": seed, "calibration_sha256": calibration_sha256,
            "dlp_version": "0.1.0"}


def reload_matching(model_dir: Path, saved: dict | None, metadata: dict, model_args, stage: str):
    """The model an earlier run saved in ``model_dir``, if the metadata saved with it (recipe, ratios or widths,
    seed, data hash) equals this run's; else None, so a changed recipe never reuses a stale model."""
    if saved is None or not (model_dir / "config.json").is_file():
        return None
    if json.dumps(saved, sort_keys=True) != json.dumps(metadata, sort_keys=True):
        return None
    print(f"[dlp] resuming: {model_dir} matches this recipe; {stage} skipped")
    model, _ = load_model_and_tokenizer(str(model_dir), model_args.dtype or "float32",
                                        model_args.attn_implementation or "sdpa")
    return model


def _resume_pruned(out: Path, metadata: dict, model, model_args):
    """(masks, pruned model) from an earlier run of the same recipe and data that stopped after pruning."""
    mask_file = out / "masks.safetensors"
    masks = MaskSet.load(mask_file) if mask_file.is_file() and (out / "model" / "config.json").is_file() else None
    pruned = reload_matching(out / "model", masks.metadata if masks else None, metadata, model_args, "pruning")
    return (masks, pruned) if pruned is not None else (None, model)


def _fill_sparsity(report: dict, model, masks: MaskSet, sparsities: list[float], scores, calib_sha: str) -> None:
    prefix, layers = find_decoder_layers(model)
    sizes = {name: math.prod(logical_shape(lin)) for name, lin in prunable_linears(model).items()}  # also 4-bit
    sparsity = masks.sparsity_report()
    report["sparsity"] = sparsity
    report["layer_sparsity"] = {
        "allocated": sparsities,
        "measured": layer_sparsity_from_modules(sparsity["modules"], sizes, len(layers), prefix),
    }
    report["layer_scores"] = [asdict(s) for s in scores] if scores else None
    report["masks_digest"] = masks.digest()
    report["calibration_sha256"] = calib_sha
