"""What each stage reports, as typed records: built once by the stage, rendered only by :mod:`dlp.report`.

``report.json`` is ``to_dict()`` of these records, with the same keys as before they were typed, so reports written
by earlier versions still load (``from_dict``) and a finished run is still recognised.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

Report = TypeVar("Report", bound="StageReport")


@dataclass
class StageReport:
    """Common to the report of every compression stage (``train/prune.py``, ``train/slice.py``)."""

    kind: ClassVar[str] = "stage"
    model: str
    config: dict[str, Any]  # the flat recipe fields the stage used (calibration, its method's, the run's)
    perplexity: dict[str, dict[str, Any] | None]  # "dense", then the compressed model's: each a Perplexity dict
    timings: dict[str, float]
    calibration_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def required_keys(cls) -> set[str]:
        return {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}

    @classmethod
    def describes(cls, data: dict[str, Any] | None) -> bool:
        """Whether ``data`` (a ``report.json``) is a finished report of this kind of stage."""
        return data is not None and cls.required_keys() <= set(data)

    @classmethod
    def from_dict(cls: type[Report], data: dict[str, Any]) -> Report:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class PruneReport(StageReport):
    """A pruning run: the allocation, the masks and what they remove, per module and per layer."""

    kind: ClassVar[str] = "prune"
    target_sparsity: float
    sparsity: dict[str, Any]  # overall, weights, modules (name -> sparsity)
    layer_sparsity: dict[str, list[float]]  # allocated, measured
    layer_scores: list[dict[str, float]] | None
    masks_digest: str
    zero_shot: dict[str, Any] | None = None
    allocation_details: dict[str, Any] | None = None  # what the allocator adds (the search: its result, fitness)
    peak_memory: dict[str, float | None] | None = None  # dlp.resources.peak_memory of the process that ran it
    sparse_export: dict[str, Any] | None = None  # model-sparse/: its values and sizes (dlp.compress.checkpoint_sizes)


@dataclass
class SliceReport(StageReport):
    """A slicing run: per-layer fractions and widths, and the parameter counts before and after."""

    kind: ClassVar[str] = "slice"
    slicing: dict[str, Any]
    peak_memory: dict[str, float | None] | None = None  # dlp.resources.peak_memory of the process that ran it


@dataclass
class FinetuneReport:
    """The prune-then-finetune pipeline: the stage's figures, training, merge, export and evaluation.

    ``compression`` is the compression method's own section (pruning: sparsity, layer_sparsity, masks_digest;
    slicing: slicing); in ``report.json`` its keys sit at the top level, as before."""

    model: str
    method: str
    config: dict[str, Any]
    perplexity: dict[str, dict[str, Any] | None]
    calibration_sha256: str
    merge: dict[str, Any]
    export: dict[str, Any]
    quantization: dict[str, Any] | None
    training: dict[str, Any]
    log_history: list[dict[str, Any]]
    timings: dict[str, float]
    compression: dict[str, Any] = field(default_factory=dict)
    distillation: dict[str, Any] | None = None  # the teacher, its mode and the loss mix (None: plain LM loss)
    peak_memory: dict[str, float | None] | None = None  # of the process that finished the run (dlp.resources)
    chat: dict[str, Any] | None = None  # the chat evaluation (dlp.chat.chat_evaluation), when it ran

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        compression = data.pop("compression")
        return {**data, **compression}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneReport":
        names = {f.name for f in fields(cls)} - {"compression"}
        return cls(
            **{key: value for key, value in data.items() if key in names},
            compression={key: value for key, value in data.items() if key not in names},
        )
