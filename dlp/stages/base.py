"""What every compression stage shares (the method interface and its registry: :mod:`dlp.stages.method`).

The parts of a stage every method repeats: the finished-run check and the claimed, locked ``output_dir``
(:func:`run_stage`), seeding and loading, the dense scoring sweep with its cache, and reusing a model an earlier
run saved.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import CalibrationArguments, EvalArguments, RunArguments
from ..data import check_source, load_calibration
from ..errors import require
from ..evaluate import perplexity
from ..rundir import (
    RunLock,
    atomic_write_json,
    check_writable_dir,
    is_dlp_dir,
    read_json,
    recipe_changes,
    start_output_dir,
)
from ..modeling import load_model_and_tokenizer
from ..process import resolve_device, setup
from ..scoring import LayerScores, Scoring, score_layers
from ..report_schema import StageReport
from ..resources import timed


def run_stage(
    run_args: RunArguments,
    config: dict[str, Any],
    preflight: Callable[[], object],
    report_type: type[StageReport],
    stage: Callable[[], StageReport],
) -> StageReport:
    """A compression stage's entry: the report of a run of this ``config`` already finished in ``output_dir``
    (unless ``--overwrite``), else ``stage()`` run in the claimed ``output_dir`` under its lock (:class:`RunLock`).

    ``preflight`` (the checks that need no weights) runs before anything is written or removed, so a refused run
    leaves ``output_dir`` as it found it. A finished run of another ``config`` is refused with the fields that differ.
    After the lock is taken the finished check runs again: a run this one waited for may have finished meanwhile."""
    out, changes = Path(run_args.output_dir), config_changes(config)
    finished = finished_report(out, run_args.overwrite, changes)
    if finished is None:
        preflight()
        with RunLock(out, run_args.wait_for_lock) as lock:
            start_output_dir(out, run_args.overwrite, lock=lock)
            finished = finished_report(out, False, changes)  # --overwrite has just removed the report it would find
            if finished is None:
                return stage()
    return report_type.from_dict(finished)


def finished_report(
    out: Path, overwrite: bool, changes: Callable[[dict[str, Any]], list[str]] | None = None, announce: bool = True
) -> dict[str, Any] | None:
    """The report of a run already finished in the dlp directory ``out`` (None with ``overwrite``); ``out`` must be
    a place dlp may write to either way (checked without writing).

    ``changes(report)``: how this run's recipe differs from the finished run's (``key: old → new`` lines). A finished
    run answers only the same recipe: any change is refused in one line naming the fields."""
    check_writable_dir(out)
    finished = read_json(out / "report.json") if is_dlp_dir(out) and not overwrite else None
    if finished is None:
        return None
    changed = changes(finished) if changes is not None else []
    require(
        not changed,
        f"output_dir {out} holds a finished run of another recipe ({'; '.join(changed[:3])}); rerun with "
        "--overwrite true to redo it, or choose another output_dir",
    )
    if announce:
        print(f"[dlp] {out} already holds a finished run of this recipe (report.json); use --overwrite to start over")
    return finished


def config_changes(config: dict[str, Any]) -> Callable[[dict[str, Any]], list[str]]:
    """:func:`finished_report`'s comparison for a stage, whose report records its flat recipe as ``config``."""
    return lambda report: recipe_changes(report.get("config") or {}, config)


def check_run_inputs(calib_args: CalibrationArguments, eval_args: EvalArguments) -> None:
    """The calibration and evaluation texts and the compute device, which every compression stage shares."""
    check_source(calib_args.calibration_data, "calibration_data")
    check_source(eval_args.eval_data, "eval_data")
    resolve_device(calib_args.device)


@dataclass
class StageStart:
    """What every compression stage starts from: the dense model and its tokenizer, the compute device, the
    seeded calibration windows, and the one way its perplexities are measured."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    calibration: Any  # dlp.data.load_calibration's windows (input_ids, sha256)
    eval_args: EvalArguments
    timings: dict[str, float] = field(default_factory=dict)  # the stage's parts, in dlp.resources' names

    def perplexity(self, model: nn.Module, name: str) -> dict[str, Any]:
        """``model``'s perplexity on the evaluation text, printed as the ``name`` model's (timed as eval_<name>)."""
        eval_args = self.eval_args
        with timed(self.timings, f"eval_{name}"):
            measured = perplexity(
                model,
                self.tokenizer,
                eval_args.eval_data,
                seqlen=eval_args.eval_seqlen,
                max_windows=eval_args.max_windows,
                batch_size=eval_args.eval_batch_size,
                device=self.device,
            ).to_dict()
        print(f"[dlp] {name} perplexity {measured['value']:.2f}")
        return measured

    def dense_perplexity(self) -> dict[str, Any]:
        """``{"dense": ...}`` when the recipe asks for the dense model's figure (``eval_dense``), else nothing."""
        return {"dense": self.perplexity(self.model, "dense")} if self.eval_args.eval_dense else {}


def prepare_run(model_args, calib_args: CalibrationArguments, eval_args: EvalArguments) -> StageStart:
    """Seeds, the compute device, the dense model with its tokenizer and the calibration windows, for a run that
    is not finished yet."""
    setup(calib_args.seed)
    timings: dict[str, float] = {}
    with timed(timings, "load"):
        model, tokenizer = load_model_and_tokenizer(
            model_args.model_name_or_path, model_args.dtype or "float32", model_args.attn_implementation or "sdpa"
        )
        calibration = load_calibration(
            tokenizer,
            calib_args.calibration_data,
            calib_args.nsamples,
            calib_args.seqlen,
            calib_args.seed,
            calib_args.calibration_split,
        )
    return StageStart(model, tokenizer, resolve_device(calib_args.device), calibration, eval_args, timings)


def run_config(calib_args: CalibrationArguments, method_args, run_args: RunArguments) -> dict[str, Any]:
    """The flat recipe a stage records: calibration, the method's own fields and the run's (nothing else)."""
    return {**asdict(calib_args), **asdict(method_args), **asdict(run_args)}


def cache_key(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def dense_layer_scores(
    out: Path,
    model,
    model_args,
    calib_args: CalibrationArguments,
    calibration,
    owl_m: float = 5.0,
    keep_stats: bool = False,
) -> Scoring:
    """The dense scoring sweep's per-layer scores, cached in ``layer_scores.json`` (keyed by model, dtype,
    calibration data and settings). With ``keep_stats`` the sweep always runs and keeps every Linear's statistics.
    ``calibration``: the loaded windows (:func:`dlp.data.load_calibration`)."""
    batch = calib_args.calibration_batch_size

    def compute() -> Scoring:
        return score_layers(
            model,
            calibration.input_ids,
            owl_m=owl_m,
            device=resolve_device(calib_args.device),
            batch_size=batch,
            keep_stats=keep_stats,
            memory=calib_args.calibration_memory,
        )

    if keep_stats:
        return compute()
    key = cache_key(
        {
            "model": model_args.model_name_or_path,
            "dtype": model_args.dtype,
            "data": calibration.sha256,
            "owl_m": owl_m,
            "batch": batch,
        }
    )
    path = out / "layer_scores.json"
    cached = read_json(path)
    if cached and cached.get("key") == key:
        return Scoring([LayerScores(**s) for s in cached["layers"]])
    scoring = compute()
    atomic_write_json(path, {"key": key, "layers": [asdict(s) for s in scoring.layers]})
    return scoring


def reload_matching(model_dir: Path, saved: dict | None, metadata: dict, model_args, stage: str):
    """The model an earlier run saved in ``model_dir``, if the metadata saved with it (recipe, ratios or widths,
    seed, data hash) equals this run's; else None, so a changed recipe never reuses a stale model."""
    if saved is None or not (model_dir / "config.json").is_file():
        return None
    if json.dumps(saved, sort_keys=True) != json.dumps(metadata, sort_keys=True):
        return None
    print(f"[dlp] resuming: {model_dir} matches this recipe; {stage} skipped")
    model, _ = load_model_and_tokenizer(
        str(model_dir), model_args.dtype or "float32", model_args.attn_implementation or "sdpa"
    )
    return model
