"""Every layerwise allocation, by name: the registry the recipe's ``allocation`` values and the stages read.

Each allocator registers itself where it is defined (:func:`dlp.allocate.register_allocator`): the one-pass
formulas (uniform, OWL, DLP, LR) and the explicit list in :mod:`dlp.allocate`, the searched allocation in
:mod:`dlp.search`. This module sits above both and imports every allocator's module, so :data:`ALLOCATORS` is
complete here; neither of them imports it (the search builds on the one-pass allocators, never the reverse).
"""

from __future__ import annotations

from typing import Sequence

from . import search  # noqa: F401  (registers "search")
from .allocate import ALLOCATORS, AllocationRequest, LayerScores, balance
from .errors import require

ALLOCATIONS = tuple(ALLOCATORS)


def compute_sparsities(
    settings, scores: Sequence[LayerScores] | None, params: Sequence[int], request: AllocationRequest | None = None
) -> list[float]:
    """Per-layer sparsities for ``settings.allocation``, balanced to ``settings.sparsity`` and clipped (an explicit
    list or a search result is taken as given). ``request``: everything else an allocator may read (the search
    needs the model and its calibration windows); by default just the settings, scores and sizes."""
    allocator = ALLOCATORS[settings.allocation]
    require(scores is not None or not allocator.needs_scores, f"allocation {allocator.name} needs the layer scores")
    request = request or AllocationRequest(settings, scores, params)
    require(
        not allocator.needs_stats or (request.model is not None and request.stats is not None),
        f"allocation {allocator.name} needs the dense model and the sweep's statistics",
    )
    raw = allocator.raw(request)
    if not allocator.rebalance:
        return raw
    return balance(raw, params, settings.sparsity, settings.max_layer_sparsity)
