"""The prune stage and the pruning method: calibration → layer scores → layerwise sparsities → masks → pruned model.

Each step writes its artifact atomically into ``output_dir`` and a rerun picks up after the last finished one:
``layer_scores.json`` (dense sweep, keyed by model, data hash and settings), ``masks.safetensors`` and
``model/`` (pruned weights; reused when the masks' metadata — recipe, ratios, seed, data hash — matches), then
``report.json`` (whose presence marks the stage finished; ``--overwrite`` starts over).

In the pipeline, a pruned model carries its masks through LoRA (mask-exact adapters), merge and export.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ..allocate import AllocationRequest, explicit_sparsities, weighted_mean
from ..allocators import ALLOCATORS, compute_sparsities
from ..compress import checkpoint_sizes, compressed_dir, export_compressed
from ..config import CalibrationArguments, EvalArguments, ExportArguments, PruneArguments, RunArguments
from ..criteria import PruneSpec, get_criterion, parse_pattern
from ..errors import ResultCheckFailed, require
from ..evaluate import zero_shot
from ..rundir import NOT_RECIPE, atomic_dir
from ..masks import MaskSet, model_fingerprint
from ..modeling import find_decoder_layers, prunable_linears
from ..preflight import ModelPlan, check_lengths, check_masks_fit, check_pattern_fits, inspect_model
from ..projections import logical_shape
from ..pruner import layer_param_counts, prune_model
from ..scoring import Scoring
from ..report import PRUNE_CARD_VIEW, PRUNE_STAGE_VIEW, layer_sparsity_from_modules, write_stage_report
from ..report_schema import PruneReport
from ..resources import peak_memory, saved_bytes, timed
from .base import (
    StageStart,
    check_run_inputs,
    dense_layer_scores,
    prepare_run,
    reload_matching,
    run_config,
    run_stage,
)
from .method import CompressionMethod, register

SPARSITY_TOLERANCE = 0.001  # overall sparsity may miss its target by at most 0.1 point (rounding to whole weights)


def check_overall_sparsity(masks: MaskSet, target: float) -> float:
    """The masks' overall sparsity, which must be the target's: a gap means an allocation or a criterion did not do
    what the report would claim, so the run stops with the two numbers instead of saving such masks."""
    overall = masks.sparsity_report()["overall"]
    if abs(overall - target) > SPARSITY_TOLERANCE:
        raise ResultCheckFailed(
            f"prune: the masks remove {100 * overall:.2f}% of the weights, but the target was "
            f"{100 * target:.2f}% (more than {100 * SPARSITY_TOLERANCE:.1f} point apart); "
            "nothing was saved"
        )
    return overall


def check_prune_settings(
    model_args, calib_args: CalibrationArguments, prune_args: PruneArguments, eval_args: EvalArguments, **lengths: int
) -> ModelPlan:
    """Everything about a prune recipe that can be checked against the model's config alone (see preflight.py)."""
    plan = inspect_model(model_args.model_name_or_path)
    check_lengths(plan, seqlen=calib_args.seqlen, eval_seqlen=eval_args.eval_seqlen, **lengths)
    if prune_args.allocation == "explicit":
        explicit_sparsities(prune_args.layer_sparsities, plan.num_layers, prune_args.max_layer_sparsity)
    pattern = parse_pattern(prune_args.pattern)
    if pattern.is_nm:
        check_pattern_fits(plan, pattern.m, prune_args.pattern)
    check_run_inputs(calib_args, eval_args)
    return plan


def run_prune(
    model_args,
    calib_args: CalibrationArguments,
    prune_args: PruneArguments,
    eval_args: EvalArguments,
    run_args: RunArguments,
    export: ExportArguments | None = None,
) -> PruneReport:
    """Prune ``model_args.model_name_or_path`` as configured; return the report (also written to output_dir).

    ``export`` (``train/prune.py``'s export settings) adds the sparse checkpoint ``model-sparse/`` beside the dense
    ``model/``; the pipeline's own prune stage passes none (it exports the fine-tuned model instead)."""
    config = run_config(calib_args, prune_args, run_args) | (asdict(export) if export else {})

    def preflight() -> None:
        check_prune_settings(model_args, calib_args, prune_args, eval_args)
        require(
            export is None or export.export_dense,
            "export_dense: train/prune.py always writes the dense model/ (fine-tuning and resuming start from it); "
            "leave it true (or set save_model false to write no model)",
        )

    return run_stage(
        run_args,
        config,
        preflight,
        PruneReport,
        lambda: _prune_run(model_args, calib_args, prune_args, eval_args, run_args, config, export),
    )


def _prune_run(
    model_args,
    calib_args: CalibrationArguments,
    prune_args: PruneArguments,
    eval_args: EvalArguments,
    run_args: RunArguments,
    config: dict[str, Any],
    export: ExportArguments | None = None,
) -> PruneReport:
    """The prune stage in a locked ``output_dir`` that holds no finished run (see :func:`run_prune`)."""
    out = Path(run_args.output_dir)
    inputs = prepare_run(model_args, calib_args, eval_args)
    model, tokenizer, device, calibration = inputs.model, inputs.tokenizer, inputs.device, inputs.calibration
    ppl: dict[str, Any] = inputs.dense_perplexity()
    timings = inputs.timings

    params = layer_param_counts(model)
    scoring, sparsities = _allocate(out, inputs, model_args, calib_args, prune_args, params, timings)
    target = weighted_mean(sparsities, params)  # = sparsity, except for an explicit list (its own weighted mean)
    print(
        "[dlp] layer sparsities: " + " ".join(f"{100 * s:.1f}" for s in sparsities) + f" (overall {100 * target:.2f}%)"
    )

    metadata = mask_metadata(
        model, model_args.model_name_or_path, config, sparsities, calib_args.seed, calibration.sha256
    )
    with timed(resumed := {}, "resume"):
        masks, model = _resume_pruned(out, metadata, model, model_args) if run_args.save_model else (None, model)
    if masks is not None:  # an earlier run's pruned model and masks
        timings.update(resumed)
    else:
        with timed(timings, "prune"):
            masks = _prune(inputs, calib_args, prune_args, sparsities, scoring)
        masks.metadata = metadata
        check_overall_sparsity(masks, target)  # before anything is saved: no artifact that contradicts the target
        with timed(timings, "save"):
            masks.save(out / "masks.safetensors")
            if run_args.save_model:
                with atomic_dir(out / "model", size=saved_bytes(model)) as tmp:
                    model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
    assert masks.violations(model) == 0, "pruned weights are not all zero"  # an internal invariant, not user input
    sparse = None
    if export is not None and export.export_sparse and run_args.save_model:
        with timed(timings, "export_sparse"):
            sparse = _export_sparse(out / "model", model, tokenizer, masks, export)

    ppl["pruned"] = inputs.perplexity(model, "pruned")
    report = PruneReport(
        model=model_args.model_name_or_path,
        config=config,
        perplexity=ppl,
        timings=timings,
        calibration_sha256=calibration.sha256,
        peak_memory=peak_memory(device),
        target_sparsity=target,
        **_sparsity_section(model, masks, sparsities),
        layer_scores=[asdict(s) for s in scoring.layers] if scoring else None,
        allocation_details=describe(out) if (describe := ALLOCATORS[prune_args.allocation].describe) else None,
        sparse_export=sparse,
    )
    if eval_args.eval_tasks:
        report.zero_shot = zero_shot(
            model, tokenizer, [t.strip() for t in eval_args.eval_tasks.split(",") if t.strip()]
        )
    write_stage_report(out, report, PRUNE_STAGE_VIEW)
    return report


def _prune(inputs: StageStart, calib_args, prune_args: PruneArguments, sparsities: list[float], scoring) -> MaskSet:
    """Prune the model in place at the allocated ``sparsities``; fast mode reuses the scoring sweep's statistics."""
    spec = PruneSpec(
        prune_args.criterion,
        parse_pattern(prune_args.pattern),
        prune_args.sparsegpt_blocksize,
        prune_args.sparsegpt_percdamp,
    )
    return prune_model(
        inputs.model,
        inputs.calibration.input_ids,
        sparsities,
        spec,
        mode=prune_args.prune_mode,
        device=inputs.device,
        batch_size=calib_args.calibration_batch_size,
        stats=scoring.stats if scoring else None,
        memory=calib_args.calibration_memory,
    )


def _allocate(
    out: Path,
    inputs: StageStart,
    model_args,
    calib_args: CalibrationArguments,
    prune_args: PruneArguments,
    params: list[int],
    timings: dict[str, float],
) -> tuple[Scoring | None, list[float]]:
    """(the dense sweep's scoring or None, the per-layer sparsities): the sweep runs when the allocator needs its
    scores or statistics, or when fast mode prunes from them; ``timings`` gets score_s and allocate_s."""
    allocator = ALLOCATORS[prune_args.allocation]
    fast = prune_args.prune_mode == "fast" and get_criterion(prune_args.criterion).needs_data
    keep_stats = fast or allocator.needs_stats
    scoring = None
    if allocator.needs_scores or keep_stats:
        with timed(timings, "score"):
            scoring = dense_layer_scores(
                out, inputs.model, model_args, calib_args, inputs.calibration, prune_args.owl_m, keep_stats
            )
    request = AllocationRequest(
        prune_args,
        scoring.layers if scoring else None,
        params,
        model=inputs.model,
        input_ids=inputs.calibration.input_ids,
        stats=scoring.stats if scoring else None,
        out=out,
        device=inputs.device,
        batch_size=calib_args.calibration_batch_size,
        seed=calib_args.seed,
    )
    with timed(timings, "allocate"):
        sparsities = compute_sparsities(prune_args, request.scores, params, request)
    return scoring, sparsities


# What the model is exported as does not shape the masks: kept out of their metadata, so equal masks stay equal bytes.
EXPORT_KEYS = frozenset(f.name for f in fields(ExportArguments))


def _export_sparse(dense_dir: Path, model, tokenizer, masks: MaskSet, export: ExportArguments) -> dict[str, Any]:
    """The sparse checkpoint beside ``dense_dir``, and what it weighs. Written even when a resumed run finds one:
    the masks a run resumes from do not record the export settings, so one left by a run with other values would
    be stale (writing it takes seconds)."""
    target = compressed_dir(dense_dir)
    export_compressed(model, tokenizer, masks, target, export.export_values, export.export_group_size)
    sizes = checkpoint_sizes(target)
    return {"dir": target.name, "values": export.export_values, **sizes}


def mask_metadata(
    model, model_id: str, config: dict[str, Any], sparsities: list[float], seed: int, calibration_sha256: str
) -> dict[str, Any]:
    """What a mask file records of how it was made: the model and its fingerprint, the recipe (not where it was
    written, nor whether to start over: those do not shape the masks, and would make equal masks differ in bytes),
    the per-layer sparsities, the seed and the calibration data's hash."""
    recipe = {key: value for key, value in config.items() if key not in NOT_RECIPE and key not in EXPORT_KEYS}
    return {
        "model": model_id,
        "fingerprint": model_fingerprint(model),
        "recipe": recipe,
        "layer_sparsities": sparsities,
        "seed": seed,
        "calibration_sha256": calibration_sha256,
        "dlp_version": "0.1.0",
    }


def _resume_pruned(out: Path, metadata: dict, model, model_args):
    """(masks, pruned model) from an earlier run of the same recipe and data that stopped after pruning."""
    mask_file = out / "masks.safetensors"
    masks = MaskSet.load(mask_file) if mask_file.is_file() and (out / "model" / "config.json").is_file() else None
    pruned = reload_matching(out / "model", masks.metadata if masks else None, metadata, model_args, "pruning")
    return (masks, pruned) if pruned is not None else (None, model)


def _sparsity_section(model, masks: MaskSet, sparsities: list[float]) -> dict[str, Any]:
    """The masks' sparsity per module and overall, and per layer as allocated and as measured."""
    prefix, layers = find_decoder_layers(model)
    sizes = {name: math.prod(logical_shape(lin)) for name, lin in prunable_linears(model).items()}  # also 4-bit
    sparsity = masks.sparsity_report()
    measured = layer_sparsity_from_modules(sparsity["modules"], sizes, len(layers), prefix)
    return {
        "sparsity": sparsity,
        "layer_sparsity": {"allocated": sparsities, "measured": measured},
        "masks_digest": masks.digest(),
    }


class PruneMethod(CompressionMethod):
    """Unstructured or N:M pruning with fixed masks (``train/prune.py``); the masks stay exact through training
    (mask-exact LoRA), merge and export."""

    name = "prune"
    arguments = PruneArguments
    report_type = PruneReport
    compressed_name = "pruned"
    script = "train/prune.py"
    compressible = True
    stage_view = PRUNE_STAGE_VIEW
    card_view = PRUNE_CARD_VIEW
    reuse_field = "prune_dir"
    supports_4bit = True

    def check_settings(self, model_args, calib, method_args, eval_args, **lengths: int) -> ModelPlan:
        return check_prune_settings(model_args, calib, method_args, eval_args, **lengths)

    def check_reuse(self, plan: ModelPlan, reuse_dir: Path) -> None:
        reused = reuse_dir / "masks.safetensors"
        require(
            reused.is_file(),
            f"prune_dir: {reuse_dir} holds no masks.safetensors (a finished train/prune.py run is needed)",
        )
        masks = MaskSet.load(reused)
        check_masks_fit(plan, masks.metadata, {n: tuple(m.shape) for n, m in masks.masks.items()}, "prune_dir")

    def run(self, model_args, calib, method_args, eval_args, run_args) -> PruneReport:
        return run_prune(model_args, calib, method_args, eval_args, run_args)

    def masks(self, stage_dir: Path) -> MaskSet:
        return MaskSet.load(stage_dir / "masks.safetensors")

    def compression_section(self, stage_report, evaluation: dict[str, Any]) -> dict[str, Any]:
        return {
            "sparsity": stage_report.sparsity,
            "layer_sparsity": stage_report.layer_sparsity,
            "masks_digest": evaluation["masks_digest"],
        }

    def headline(self, report: dict[str, Any]) -> str:
        return f"sparsity {100 * report['sparsity']['overall']:.2f}%"


register(PruneMethod())
