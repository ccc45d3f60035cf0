"""Calibration-driven pruning built on the sweep engine: the pruning visitors and the pruning entry point (the dense
scoring sweep that allocations read is :mod:`dlp.scoring`).

* :func:`prune_model` — ``mode="sequential"`` (default): per layer, a forward that accumulates input
  statistics, pruning, and a second forward whose outputs (of the pruned layer) feed the next layer.
  ``mode="fast"``: no sweep at all; every Linear is pruned from the statistics the dense scoring sweep kept
  (``score_layers(keep_stats=True)``), so the whole job is one forward per layer (Wanda and magnitude).
  ``mode="onepass"``: one forward per layer over the whole calibration batch; a pre-hook prunes each Linear as
  soon as its input for the whole batch is known, so later Linears of the block already see pruned inputs
  (works for SparseGPT too).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .errors import require
from .masks import MaskSet
from .modeling import find_decoder_layers, find_linears
from .criteria import CRITERIA, PruneSpec, get_criterion, prune_linear
from .stats import InputStats, _SharedReducer, collect_input_stats
from .sweep import LayerContext, sweep
from .projections import in_features, logical_shape

__all__ = ["MODES", "PruneSpec", "check_prune_mode", "layer_param_counts", "prune_model"]

MODES = ("sequential", "fast", "onepass")


def check_prune_mode(criterion: str, mode: str) -> None:
    """The one rule between criteria and modes: fast mode needs a criterion that prunes from kept statistics."""
    require(mode in MODES, f"prune_mode must be one of {', '.join(MODES)} (got {mode!r})")
    require(
        mode != "fast" or get_criterion(criterion).supports_fast,
        f"prune_mode fast supports criterion {', '.join(n for n, c in CRITERIA.items() if c.supports_fast)}; "
        f"use onepass or sequential for {criterion}",
    )


def layer_param_counts(model: nn.Module) -> list[int]:
    """Prunable weights per decoder layer (from the logical shapes, so packed 4-bit weights count right too)."""
    _, layers = find_decoder_layers(model)
    return [sum(math.prod(logical_shape(lin)) for lin in find_linears(layer).values()) for layer in layers]


def _sequential_visitor(sparsities: list[float], spec: PruneSpec, masks: dict, prefix: str) -> Callable:
    def visit(ctx: LayerContext) -> torch.Tensor:
        with collect_input_stats(ctx.linears, want_xtx=spec.needs_xtx) as stats:
            ctx.forward(keep_outputs=False)
        for name, linear in ctx.linears.items():
            masks[f"{prefix}.{ctx.index}.{name}"] = prune_linear(linear, stats[name], sparsities[ctx.index], spec)
        return ctx.inputs if ctx.is_last else ctx.forward()  # the last layer's outputs feed nothing

    return visit


def _onepass_visitor(sparsities: list[float], spec: PruneSpec, masks: dict, prefix: str) -> Callable:
    def visit(ctx: LayerContext) -> torch.Tensor:
        reducer = _SharedReducer()

        def prune_on_input(name: str, linear: nn.Module):
            def hook(_module: nn.Module, args: tuple) -> None:
                stats = InputStats(in_features(linear), spec.needs_xtx)
                stats.add(reducer.reduce(args[0], spec.needs_xtx))
                masks[f"{prefix}.{ctx.index}.{name}"] = prune_linear(linear, stats, sparsities[ctx.index], spec)
                handles.pop(name).remove()  # prune once, on the whole batch

            return hook

        handles = {name: lin.register_forward_pre_hook(prune_on_input(name, lin)) for name, lin in ctx.linears.items()}
        try:
            return ctx.forward()
        finally:
            for handle in handles.values():
                handle.remove()

    return visit


def prune_model(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    sparsities: list[float],
    spec: PruneSpec,
    *,
    mode: str = "sequential",
    device="cpu",
    batch_size: int = 8,
    stats: dict[str, InputStats] | None = None,
    memory: str = "auto",
) -> MaskSet:
    """Prune every decoder-layer Linear in place with per-layer ``sparsities``; return the masks.

    ``mode="fast"`` needs ``stats`` from ``score_layers(keep_stats=True)``; magnitude pruning needs no data.
    """
    prefix, layers = find_decoder_layers(model)
    masks: dict[str, torch.Tensor] = {}
    needs_data = get_criterion(spec.criterion).needs_data
    if not needs_data or mode == "fast":  # no sweep: prune from weights (and kept statistics)
        check_prune_mode(spec.criterion, mode)
        require(not needs_data or stats is not None, "prune_mode fast needs the dense sweep's statistics")
        for index, layer in enumerate(layers):
            for name, linear in find_linears(layer).items():
                full = f"{prefix}.{index}.{name}"
                masks[full] = prune_linear(linear, stats[full] if stats else None, sparsities[index], spec)
        return MaskSet(masks)
    if mode == "onepass":
        visit, batch_size = _onepass_visitor(sparsities, spec, masks, prefix), input_ids.shape[0]
    else:
        visit = _sequential_visitor(sparsities, spec, masks, prefix)
    desc = f"pruning ({spec.criterion}, {mode})"
    sweep(model, input_ids, visit, device=device, batch_size=batch_size, desc=desc, memory=memory)
    return MaskSet(masks)


_MOVED_TO_SCORING = ("score_layers", "Scoring", "token_cosines")


def __getattr__(name: str):
    """The layer-scoring names that lived here until 2026-12 (scoring is not pruning): still importable, with a
    deprecation warning; the alias goes in a later release."""
    if name not in _MOVED_TO_SCORING:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import warnings

    from . import scoring

    warnings.warn(f"dlp.pruner.{name} moved to dlp.scoring: import it from there", DeprecationWarning, stacklevel=2)
    return getattr(scoring, name)
