"""Compression methods as objects, and the registry the pipeline looks them up in.

A compression method (pruning with fixed masks, rotate-and-slice, ...) is one :class:`CompressionMethod`: it owns
every decision the pipeline, the fine-tuning, the merge and the report would otherwise take by comparing method
names — which recipe fields it reads, how its stage runs and resumes, whether its model carries masks, which
projections get LoRA adapters, how close a merged model must stay to its adapter model, whether the export ships
its own modeling code. Adding a method is one module in this package that defines its stage and registers its
object with :func:`register` at its end (plus one import line in ``dlp/stages/__init__.py``, as peft's method
packages do); nothing outside looks at its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..config import CalibrationArguments, EvalArguments, RunArguments
from ..errors import require
from ..lora import default_target_modules
from ..masks import MaskSet
from ..merge import MERGE_TOLERANCE
from ..preflight import ModelPlan
from ..report import GENERIC_VIEW, View
from ..report_schema import StageReport


class CompressionMethod:
    """What the pipeline asks of a compression method. Subclasses set the class attributes and ``run``."""

    name: str  # the recipe's ``method`` value
    arguments: type  # the dataclass of the method's own recipe fields (keys stay flat in the recipe)
    report_type: type[StageReport]
    script: str  # the method's own entry script, e.g. train/prune.py
    compressed_name: str = "compressed"  # what its model is called in reports: pruned, sliced
    reuse_field: str | None = None  # FinetuneArguments field naming a finished run of ``script`` to reuse
    trust_remote_code: bool = False  # the exported model ships its own modeling file
    compressible: bool = False  # its model has masks, so it has a compressed export (mask bits + kept values)
    supports_4bit: bool = False  # whether its compressed model can be a 4-bit (QLoRA) base
    stage_view: View = GENERIC_VIEW  # how its stage's summary.md and plot are drawn
    card_view: View = GENERIC_VIEW  # how the fine-tuned model's card and plot are drawn

    def check_settings(
        self, model_args, calib_args: CalibrationArguments, method_args, eval_args: EvalArguments, **lengths: int
    ) -> ModelPlan:
        """Every check of the recipe that needs the model's config but not its weights (one-line errors)."""
        raise NotImplementedError

    def check_reuse(self, plan: ModelPlan, reuse_dir: Path) -> None:
        """Checks of a finished run named by ``reuse_field`` that need no weights (default: none)."""

    def run(
        self,
        model_args,
        calib_args: CalibrationArguments,
        method_args,
        eval_args: EvalArguments,
        run_args: RunArguments,
    ) -> StageReport:
        """Run (or resume) the stage into ``run_args.output_dir``; return its report (also written there)."""
        raise NotImplementedError

    def masks(self, stage_dir: Path) -> MaskSet | None:
        """The masks the compressed model must keep through training and merge (None: it has none)."""
        return None

    def lora_targets(self, model: nn.Module) -> list[str]:
        """The projection names that get LoRA adapters by default: every prunable projection kind of a block."""
        return default_target_modules(model)

    def merge_tolerance(self, adapter_logits) -> float:
        """How far the merged model's logits may be from the adapter model's (fp32 max |difference|)."""
        return MERGE_TOLERANCE

    def compression_section(self, stage_report: StageReport, evaluation: dict[str, Any]) -> dict[str, Any]:
        """What the pipeline's final report keeps of the stage's report (top-level keys of report.json)."""
        return {}

    def headline(self, report: dict[str, Any]) -> str:
        """How much the model was compressed, for the scripts' result line (from a report as JSON)."""
        raise NotImplementedError


METHODS: dict[str, CompressionMethod] = {}


def register(method: CompressionMethod) -> CompressionMethod:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> CompressionMethod:
    require(name in METHODS, f"method must be one of {', '.join(METHODS)} (got {name!r})")
    return METHODS[name]
