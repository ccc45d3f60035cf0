"""The prune stage: calibration → layer scores → layerwise sparsities → masks → pruned model → report.

Each step writes its artifact atomically into ``output_dir`` and a rerun picks up after the last finished one:
``layer_scores.json`` (dense sweep, keyed by model, data hash and settings), ``masks.safetensors`` and
``model/`` (pruned weights; reused when the masks' metadata — recipe, ratios, seed, data hash — matches), then
``report.json`` (whose presence marks the stage finished; ``--overwrite`` starts over).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any


from .allocate import (LayerScores, balance, dlp_sparsities, explicit_sparsities, lr_sparsities,
                       owl_sparsities)
from .config import EvalArguments, PruneArguments, RunArguments
from .data import load_calibration
from .evaluate import perplexity, zero_shot
from .io import atomic_dir, atomic_write_json, read_json
from .layerwise import PruneSpec, layer_param_counts, prune_model, score_layers
from .masks import MaskSet
from .modeling import find_decoder_layers, load_model_and_tokenizer, prunable_linears
from .prune import parse_pattern
from .report import layer_sparsity_from_modules, write_report
from .runtime import resolve_device, setup

NEEDS_SCORES = ("dlp", "owl", "lr")


def compute_sparsities(args: PruneArguments, scores: list[LayerScores] | None, params: list[int]) -> list[float]:
    """Per-layer sparsities for ``args.allocation``, balanced to the target and clipped (see allocate.py)."""
    num_layers = len(params)
    if args.allocation == "uniform":
        raw = [args.sparsity] * num_layers
    elif args.allocation == "explicit":
        raw = explicit_sparsities(args.layer_sparsities, num_layers)
        return balance(raw, params, args.sparsity, args.max_layer_sparsity, rebalance=False)
    elif args.allocation == "dlp":
        stat = [s.wanda_median if args.dlp_statistic == "median" else s.wanda_mean for s in scores]
        raw = dlp_sparsities(stat, args.sparsity, args.dlp_alpha)
    elif args.allocation == "owl":
        raw = owl_sparsities([s.outlier_ratio for s in scores], args.sparsity, args.owl_lambda)
    else:
        raw = lr_sparsities([s.redundancy for s in scores], args.sparsity, args.lr_spread)
    return balance(raw, params, args.sparsity, args.max_layer_sparsity)


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


def finished_run(run_args: RunArguments) -> dict[str, Any] | None:
    """Start over (``--overwrite``), or return the report of a run already finished in ``output_dir``."""
    out = Path(run_args.output_dir)
    if run_args.overwrite and out.exists():
        shutil.rmtree(out)
    finished = read_json(out / "report.json")
    if finished is not None:
        print(f"[dlp] {out} already holds a finished run (report.json); use --overwrite to start over")
    return finished


def prepare_run(model_args, prune_args: PruneArguments, run_args: RunArguments):
    """Seeds, the compute device and the dense model with its tokenizer, for a run that is not finished yet."""
    setup(run_args.seed)
    model, tokenizer = load_model_and_tokenizer(model_args.model_name_or_path, model_args.dtype or "float32",
                                                model_args.attn_implementation or "sdpa")
    return model, tokenizer, resolve_device(prune_args.device)


def run_prune(model_args, prune_args: PruneArguments, eval_args: EvalArguments, run_args: RunArguments) -> dict[str, Any]:
    """Prune ``model_args.model_name_or_path`` as configured; return the report (also written to output_dir)."""
    out = Path(run_args.output_dir)
    finished = finished_run(run_args)
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
    print("[dlp] layer sparsities: " + " ".join(f"{100 * s:.1f}" for s in sparsities))

    spec = PruneSpec(prune_args.criterion, parse_pattern(prune_args.pattern), prune_args.sparsegpt_blocksize,
                     prune_args.sparsegpt_percdamp)
    metadata = {"model": model_id, "recipe": report["config"], "layer_sparsities": sparsities,
                "seed": run_args.seed, "calibration_sha256": calib.sha256, "dlp_version": "0.1.0"}
    start = time.perf_counter()
    masks, model = _resume_pruned(out, metadata, model, model_args) if run_args.save_model else (None, model)
    if masks is None:
        masks = prune_model(model, calib.input_ids, sparsities, spec, mode=prune_args.prune_mode, device=device,
                            batch_size=prune_args.calibration_batch_size, stats=stats)
        masks.metadata = metadata
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
    sizes = {name: lin.weight.numel() for name, lin in prunable_linears(model).items()}
    sparsity = masks.sparsity_report()
    report["sparsity"] = sparsity
    report["layer_sparsity"] = {
        "allocated": sparsities,
        "measured": layer_sparsity_from_modules(sparsity["modules"], sizes, len(layers), prefix),
    }
    report["layer_scores"] = [asdict(s) for s in scores] if scores else None
    report["masks_digest"] = masks.digest()
    report["calibration_sha256"] = calib_sha
