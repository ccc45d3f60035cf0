"""Layerwise sparsity allocation: from per-layer scores to per-layer sparsity ratios.

All allocators return *sparsities* (fraction of weights removed) per decoder layer. They share one rescaling:
a per-layer importance is min-max scaled to [0, 2·spread] and centred on the target, so the spread between the
most and least pruned layer is at most 2·spread. :func:`balance` then makes the parameter-weighted mean equal
to the target and clips to [0, max_sparsity], warning when it had to clip.

* ``dlp`` (Chen et al., ICML 2025): S_l = median (paper) or mean (released code) of the layer's Wanda scores
  |W|·‖X‖; u_l = 1 − S_l/ΣS; keep_l = scale(u)_l − mean(scale(u)) + (1 − target). A layer with a *larger*
  score is pruned *more*.
* ``owl`` (Yin et al., 2024): D_l = share of Wanda scores above M·mean; more outliers ⇒ less pruning.
* ``lr`` (Dynamic Slicing, 2024): redundancy R_l = mean over tokens of cos(h_in, h_out); more redundant ⇒
  pruned more.
* ``uniform``: the target everywhere; ``explicit``: a list the user gives, taken as it is.
* ``search`` (:mod:`dlp.search`, after EvoPress): measures instead of scoring; an evolutionary search over the
  layer sparsities whose fitness is the KL divergence to the dense model on calibration windows.

This module holds the types every allocator shares and the one-pass formulas; :mod:`dlp.allocators` (above this
module and :mod:`dlp.search`) is the complete registry and :func:`~dlp.allocators.compute_sparsities`. Adding an
allocator is one :func:`register_allocator` call where it is defined (its name, whether it needs the dense scoring
sweep, and the function from an :class:`AllocationRequest` to raw sparsities), the import of its module in
:mod:`dlp.allocators`, and the recipe fields of its own parameters, if it has any: the recipe's ``allocation``
choices and the stages look everything else up in the registry.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import DlpError, require
from .scoring import LayerScores

SLICING_ALLOCATIONS = ("uniform", "lr")  # per-layer slicing fractions (dlp/slicing.py)
DLP_STATISTICS = ("median", "mean")


def minmax_spread(values: torch.Tensor, spread: float) -> torch.Tensor:
    """Scale to [0, 2·spread]; all-equal values give zeros (no spread)."""
    low, high = values.min(), values.max()
    if float(high - low) == 0.0:
        return torch.zeros_like(values)
    return (values - low) / (high - low) * (2.0 * spread)


def centred(importance: Sequence[float], target: float, spread: float) -> list[float]:
    """Sparsities around ``target``: the most important layer gets target − spread·(...), the least target + ..."""
    scaled = minmax_spread(torch.tensor(importance, dtype=torch.float64), spread)
    keep = scaled - scaled.mean() + (1.0 - target)
    return (1.0 - keep).tolist()


def dlp_sparsities(layer_scores: Sequence[float], target: float, alpha: float) -> list[float]:
    """DLP: importance u_l = 1 − S_l/ΣS, so a larger score means less important and more pruning."""
    scores = torch.tensor(layer_scores, dtype=torch.float64).abs()
    require(float(scores.sum()) > 0, "dlp: every layer score is zero; calibration data or model is degenerate")
    return centred((1.0 - scores / scores.sum()).tolist(), target, alpha)


def owl_sparsities(outlier_ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """OWL: a layer with a larger share of outlier scores keeps more weights."""
    return centred(list(outlier_ratios), target, lam)


def lr_sparsities(redundancy: Sequence[float], target: float, spread: float) -> list[float]:
    """Layer Redundancy: a layer whose output is closer to its input (higher cosine) is pruned more."""
    return centred([-r for r in redundancy], target, spread)


def ranks(values: Sequence[float]) -> list[float]:
    """0-based ranks of ``values`` in ascending order, tied values sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2
        start = end + 1
    return result


def lr_ratio_sparsities(redundancy: Sequence[float], target: float, spread: float) -> list[float]:
    """The Dynamic Slicing code's mapping (``mean_cut_accuracy_experiments.py``): r = min-max scaled redundancy in
    [0, 1] and s_l = target − spread + spread · r_l / mean(r). The least redundant layer gets target − spread, the
    others rise in proportion to r; the mean stays at target, the top may exceed target + spread."""
    scaled = minmax_spread(torch.tensor(list(redundancy), dtype=torch.float64), 0.5)
    if float(scaled.mean()) == 0.0:
        return [target] * len(redundancy)
    return (target - spread + spread * scaled / scaled.mean()).tolist()


LR_MAPPINGS = {  # how Layer Redundancy scores become per-layer fractions around the target (more redundant: more)
    "minmax": lr_sparsities,  # linear in the scores over exactly target ± spread: an outlier takes the whole spread
    "rank": lambda redundancy, target, spread: lr_sparsities(ranks(redundancy), target, spread),  # linear in order
    "ratio": lr_ratio_sparsities,  # the released Dynamic Slicing code's
}


def parse_layer_sparsities(spec: str | Sequence[float], max_sparsity: float = 0.99) -> list[float]:
    """An explicit allocation: a list of floats, a comma-separated string, or a JSON file holding a list or
    ``{"sparsities": [...]}``; every value must lie in [0, ``max_sparsity``] (checked when the recipe is read)."""
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DlpError(f"layer_sparsities: {path} is not valid JSON ({str(exc).splitlines()[0][:80]})")
            values = data.get("sparsities", data.get("layer_sparsity")) if isinstance(data, dict) else data
        else:
            try:
                values = [float(v) for v in spec.split(",") if v.strip()]
            except ValueError:
                raise DlpError(f"layer_sparsities must be a JSON file or comma-separated floats (got {spec!r})")
    else:
        values = list(spec)
    require(
        isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values),
        f"layer_sparsities must be a non-empty list of numbers (got {values!r})"[:200],
    )
    bad = [v for v in values if not 0.0 <= float(v) <= max_sparsity]
    if bad:
        raise DlpError(
            f"layer_sparsities: every value must be in [0, max_layer_sparsity={max_sparsity}] (got {bad[0]})"
        )
    return [float(v) for v in values]


def explicit_sparsities(spec: str | Sequence[float], num_layers: int, max_sparsity: float = 0.99) -> list[float]:
    """:func:`parse_layer_sparsities` plus the one check that needs the model: one value per decoder layer."""
    values = parse_layer_sparsities(spec, max_sparsity)
    require(
        len(values) == num_layers,
        f"layer_sparsities must list {num_layers} values, one per decoder layer (got {len(values)})",
    )
    return values


def weighted_mean(sparsities: Sequence[float], params: Sequence[int]) -> float:
    """The overall sparsity of per-layer ``sparsities`` over layers of ``params`` prunable weights."""
    return float(sum(s * p for s, p in zip(sparsities, params)) / sum(params))


def balance(
    sparsities: Sequence[float],
    params: Sequence[int],
    target: float,
    max_sparsity: float = 0.99,
    rebalance: bool = True,
) -> list[float]:
    """Shift all sparsities by one constant so the parameter-weighted mean is ``target``, clipped to
    [0, max_sparsity] (with a warning when clipping happened).

    Decoder layers normally have equal sizes, so the centred allocators already average to the target and the
    shift is zero; with unequal sizes the shift corrects the weighted mean. With ``rebalance=False`` (explicit
    lists) the values are only clipped.
    """
    values = torch.tensor(sparsities, dtype=torch.float64)
    weights = torch.tensor(params, dtype=torch.float64)
    weights = weights / weights.sum()

    def weighted_mean(shift: float) -> float:
        return float((weights * (values + shift).clamp(0.0, max_sparsity)).sum())

    shift = 0.0
    if rebalance:
        require(0.0 <= target <= max_sparsity, f"sparsity must be in [0, {max_sparsity}] (got {target})")
        low, high = -1.0 - float(values.max()), 1.0 - float(values.min())
        for _ in range(200):  # bisection: weighted_mean is monotone in the shift
            mid = (low + high) / 2
            low, high = (mid, high) if weighted_mean(mid) < target else (low, mid)
        shift = (low + high) / 2
        if abs(weighted_mean(0.0) - target) < 1e-12:
            shift = 0.0
    shifted = values + shift
    clipped = shifted.clamp(0.0, max_sparsity)
    if bool((clipped != shifted).any()):
        layers = [i for i in range(len(values)) if float(clipped[i]) != float(shifted[i])]
        mean = float((weights * clipped).sum())
        warnings.warn(
            f"layer sparsities clipped to [0, {max_sparsity}] for layers {layers}; the weighted mean "
            f"is now {mean:.4f}" + (" (the others were shifted to keep it on target)" if rebalance else ""),
            stacklevel=2,
        )
    return clipped.tolist()


@dataclass
class AllocationRequest:
    """What an allocator may read: the recipe's pruning fields, the dense sweep's layer scores and every layer's
    prunable weights; and, for an allocator that measures candidates instead of scoring layers (``search``), the
    dense model itself with its calibration windows, the sweep's per-Linear statistics and where to keep state."""

    settings: Any  # the recipe's pruning fields (PruneArguments)
    scores: Sequence[LayerScores] | None
    params: Sequence[int]
    model: Any = None  # the dense model (left dense when the allocator returns)
    input_ids: torch.Tensor | None = None  # the calibration windows [nsamples, seqlen]
    stats: dict[str, Any] | None = None  # full Linear name -> InputStats, from score_layers(keep_stats=True)
    out: Path | None = None  # the run's output_dir (a searching allocator keeps its resumable state below it)
    device: Any = "cpu"
    batch_size: int = 8
    seed: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.params)


@dataclass(frozen=True)
class Allocator:
    """A layerwise allocation: ``raw(request)`` gives per-layer sparsities before :func:`balance`."""

    name: str
    raw: Callable[[AllocationRequest], list[float]]
    needs_scores: bool = True  # whether the dense scoring sweep must run first
    rebalance: bool = True  # False: the values are taken as given (an explicit list; a search's exact levels)
    needs_stats: bool = False  # the dense sweep must keep every Linear's input statistics (and the model is used)
    describe: Callable[[Path], "dict[str, Any] | None"] | None = None  # what the report adds, read from output_dir


def _explicit(request: AllocationRequest) -> list[float]:
    settings = request.settings
    return explicit_sparsities(settings.layer_sparsities, request.num_layers, settings.max_layer_sparsity)


def _dlp(request: AllocationRequest) -> list[float]:
    settings = request.settings
    statistic = [s.wanda_median if settings.dlp_statistic == "median" else s.wanda_mean for s in request.scores]
    return dlp_sparsities(statistic, settings.sparsity, settings.dlp_alpha)


ALLOCATORS: dict[str, Allocator] = {}  # complete once dlp.allocators is imported (it imports every allocator's module)


def register_allocator(allocator: Allocator) -> Allocator:
    """Make ``allocator`` a value of the recipe's ``allocation`` (called where the allocator is defined)."""
    ALLOCATORS[allocator.name] = allocator
    return allocator


for _allocator in (
    Allocator("uniform", lambda r: [r.settings.sparsity] * r.num_layers, needs_scores=False),
    Allocator(
        "owl",
        lambda r: owl_sparsities([s.outlier_ratio for s in r.scores], r.settings.sparsity, r.settings.owl_lambda),
    ),
    Allocator("dlp", _dlp),
    Allocator(
        "lr",
        lambda r: lr_sparsities([s.redundancy for s in r.scores], r.settings.sparsity, r.settings.lr_spread),
    ),
    Allocator("explicit", _explicit, needs_scores=False, rebalance=False),
):
    register_allocator(_allocator)
ONE_PASS_ALLOCATIONS = ("uniform", "owl", "dlp", "lr")  # one statistic per layer, no measuring of candidates
