"""The slice stage and the slicing method: calibration → (Layer Redundancy scores) → per-layer widths → rotated and
sliced model → report.

Artifacts in ``output_dir``, each written atomically: ``layer_scores.json`` (the dense scoring sweep, shared with
pruning and keyed the same way), ``model/`` (the sliced model with its own modeling file, loadable with
``trust_remote_code=True``) with ``slicing.json`` beside it (the widths and what produced them: a rerun with the
same recipe and data reuses the model), then ``report.json``, ``summary.md`` and ``widths.png``; ``report.json``
comes last and marks the stage finished.

In the pipeline, a sliced model has no masks: its weights are dense, only smaller, so its LoRA is peft's own; the
basis changes slicing inserts get no adapters, and the export ships the sliced architecture's modeling file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import CalibrationArguments, EvalArguments, RunArguments, SliceArguments
from ..rundir import atomic_write_json, read_json
from ..export import export_model
from ..merge import MERGE_TOLERANCE
from ..modeling import find_decoder_layers
from ..preflight import ModelPlan, check_lengths, inspect_model
from ..report import SLICE_CARD_VIEW, SLICE_STAGE_VIEW, write_stage_report
from ..report_schema import SliceReport
from ..resources import peak_memory, timed
from ..sliced import SLICING_STRUCTURE
from ..slicing import (
    check_sliceable,
    check_sliceable_type,
    check_slicing_mean,
    parameter_count,
    slice_model,
    sliced_widths,
    slicing_fractions,
)
from .base import (
    check_run_inputs,
    dense_layer_scores,
    prepare_run,
    reload_matching,
    run_config,
    run_stage,
)
from .method import CompressionMethod, register

SLICING_FILE = "slicing.json"
# Plain LoRA (a sliced model) computes W·x + s·B·(A·x) in training but (W + s·B·A)·x once merged: the same
# function in another summation order, so its guard is relative to the logits' size. On SmolLM2 sliced by 25-30%
# the two differed by 1e-4 to 5e-4 on logits up to about 38 with min-max widths, but by 0.0125 on logits up to 40
# with the ratio mapping's widths (3.1e-4 of the logits; the same check in float64 differs by 2e-6, the float32
# norms' rounding), while a wrong merge differs by O(1). Hence 1e-3 of the largest logit.
PLAIN_MERGE_RELATIVE_TOLERANCE = 1e-3


def run_slice(
    model_args,
    calib_args: CalibrationArguments,
    slice_args: SliceArguments,
    eval_args: EvalArguments,
    run_args: RunArguments,
) -> SliceReport:
    """Slice ``model_args.model_name_or_path`` as configured; return the report (also written to output_dir)."""
    config = run_config(calib_args, slice_args, run_args)
    preflight = lambda: check_slice_settings(model_args, calib_args, eval_args)  # noqa: E731
    return run_stage(
        run_args,
        config,
        preflight,
        SliceReport,
        lambda: _slice_run(model_args, calib_args, slice_args, eval_args, run_args, config),
    )


def _slice_run(
    model_args,
    calib_args: CalibrationArguments,
    slice_args: SliceArguments,
    eval_args: EvalArguments,
    run_args: RunArguments,
    config: dict[str, Any],
) -> SliceReport:
    """The slice stage in a locked ``output_dir`` that holds no finished run (see :func:`run_slice`)."""
    out = Path(run_args.output_dir)
    inputs = prepare_run(model_args, calib_args, eval_args)
    model, tokenizer, device, calibration = inputs.model, inputs.tokenizer, inputs.device, inputs.calibration
    check_sliceable(model)
    ppl: dict[str, Any] = inputs.dense_perplexity()
    timings = inputs.timings

    _, layers = find_decoder_layers(model)
    redundancy = None
    if slice_args.slicing_allocation == "lr":
        with timed(timings, "score"):
            scoring = dense_layer_scores(out, model, model_args, calib_args, calibration)
        redundancy = [s.redundancy for s in scoring.layers]
    fractions = slicing_fractions(
        slice_args.slicing_allocation,
        slice_args.slicing,
        len(layers),
        redundancy,
        slice_args.slicing_spread,
        mapping=slice_args.slicing_lr_mapping,
    )
    widths = sliced_widths(fractions, model.config.hidden_size, slice_args.slicing_multiple)
    check_slicing_mean(widths, model.config.hidden_size, slice_args.slicing, slice_args.slicing_multiple)
    print("[dlp] sliced widths: " + " ".join(str(w) for w in widths))

    metadata = {
        "model": model_args.model_name_or_path,
        "recipe": config,
        "widths": widths,
        "seed": calib_args.seed,
        "calibration_sha256": calibration.sha256,
    }
    with timed(resumed := {}, "resume"):
        sliced = reload_matching(out / "model", read_json(out / SLICING_FILE), metadata, model_args, "slicing")
    if sliced is not None:  # an earlier run's sliced model
        timings.update(resumed)
    else:
        with timed(timings, "slice"):
            sliced = slice_model(
                model,
                calibration.input_ids,
                widths,
                device=device,
                batch_size=calib_args.calibration_batch_size,
                memory=calib_args.calibration_memory,
            )
        with timed(timings, "save"):
            export_model(sliced, tokenizer, None, out / "model")  # with its modeling file
            atomic_write_json(out / SLICING_FILE, metadata)
    ppl["sliced"] = inputs.perplexity(sliced, "sliced")
    report = SliceReport(
        model=model_args.model_name_or_path,
        config=config,
        perplexity=ppl,
        timings=timings,
        calibration_sha256=calibration.sha256,
        peak_memory=peak_memory(device),
        slicing=_slicing_summary(model, sliced, fractions, widths, redundancy),
    )
    write_stage_report(out, report, SLICE_STAGE_VIEW)
    return report


def check_slice_settings(
    model_args, calib_args: CalibrationArguments, eval_args: EvalArguments, **lengths: int
) -> ModelPlan:
    """What a slice recipe can be checked for against the model's config alone (see preflight.py)."""
    plan = inspect_model(model_args.model_name_or_path)
    check_sliceable_type(plan.model_type)
    check_lengths(plan, seqlen=calib_args.seqlen, eval_seqlen=eval_args.eval_seqlen, **lengths)
    check_run_inputs(calib_args, eval_args)
    return plan


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
        "parameters": {
            "dense": dense_params,
            "sliced": sliced_params,
            "ratio": sliced_params / dense_params,
            "dense_without_embeddings": dense_blocks,
            "sliced_without_embeddings": sliced_blocks,
            "ratio_without_embeddings": sliced_blocks / dense_blocks,
        },
    }


class SliceMethod(CompressionMethod):
    """Rotate-and-slice with uniform or Layer-Redundancy widths (``train/slice.py``): a smaller dense model, no
    masks; plain LoRA on its projections; the export ships ``modeling_sliced.py``."""

    name = "slice"
    arguments = SliceArguments
    report_type = SliceReport
    compressed_name = "sliced"
    script = "train/slice.py"
    stage_view = SLICE_STAGE_VIEW
    card_view = SLICE_CARD_VIEW
    reuse_field = "slice_dir"
    trust_remote_code = True

    def check_settings(self, model_args, calib, method_args, eval_args, **lengths: int) -> ModelPlan:
        return check_slice_settings(model_args, calib, eval_args, **lengths)

    def run(self, model_args, calib, method_args, eval_args, run_args) -> SliceReport:
        return run_slice(model_args, calib, method_args, eval_args, run_args)

    def lora_targets(self, model) -> list[str]:
        """The sliced blocks' projections, without the basis changes (``input_proj``, ``attn_shortcut``,
        ``mlp_shortcut``): those are rotations, not learned projections, and an adapter would only add parameters."""
        return sorted(set(super().lora_targets(model)) - set(SLICING_STRUCTURE))

    def merge_tolerance(self, adapter_logits) -> float:
        return max(MERGE_TOLERANCE, PLAIN_MERGE_RELATIVE_TOLERANCE * float(adapter_logits.abs().max()))

    def compression_section(self, stage_report, evaluation: dict[str, Any]) -> dict[str, Any]:
        return {"slicing": stage_report.slicing}

    def headline(self, report: dict[str, Any]) -> str:
        return f"sliced {100 * report['slicing']['mean_fraction']:.2f}% of the width"


register(SliceMethod())
