"""The dense scoring sweep: one forward per decoder layer, measuring what every allocation reads of a layer.

Nothing is pruned here. :func:`score_layers` runs the sweep engine (:mod:`dlp.sweep`) over the calibration windows
and gives each layer's :class:`LayerScores`: the median and mean of its Wanda scores |W|·‖X‖ (DLP), the share of
outlier scores (OWL) and the mean cosine between its input and output hidden states (Layer Redundancy, which
slicing reads too). With ``keep_stats`` it also keeps every Linear's input statistics, so that
``prune_model(mode="fast")`` prunes from them without a second sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .criteria import wanda_scores
from .modeling import find_decoder_layers
from .projections import logical_weight
from .stats import InputStats, collect_input_stats
from .sweep import LayerContext, sweep


@dataclass(frozen=True)
class LayerScores:
    """What the dense calibration sweep measures of one decoder layer (enough for every allocator)."""

    wanda_median: float
    wanda_mean: float
    outlier_ratio: float  # share of Wanda scores above owl_m × their mean
    redundancy: float  # mean over tokens of cos(h_in, h_out)
    params: int  # prunable weights in the layer


def _layer_score(ctx: LayerContext, stats: dict[str, InputStats], cosine: torch.Tensor, owl_m: float) -> LayerScores:
    """Every allocator's score of one dense layer, from its Linears' input statistics and the per-token cosine
    between the layer's inputs and outputs (``cosine``, one value per token, computed where the layer ran)."""
    scores = torch.cat(
        [wanda_scores(logical_weight(lin), stats[name].sq_mean).flatten() for name, lin in ctx.linears.items()]
    )
    return LayerScores(
        wanda_median=float(scores.median()),
        wanda_mean=float(scores.mean()),
        outlier_ratio=float((scores > owl_m * scores.mean()).float().mean()),
        redundancy=float(cosine.mean()),
        params=scores.numel(),
    )


def token_cosines(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """cos(h_in, h_out) per token, flattened (Layer Redundancy's ingredient), in float32."""
    return F.cosine_similarity(inputs.float(), outputs.float(), dim=-1).flatten()


@dataclass
class Scoring:
    """What the dense scoring sweep measured: every layer's scores, and (when asked) every Linear's statistics."""

    layers: list[LayerScores]
    stats: dict[str, InputStats] | None = None  # full Linear name -> input statistics (for prune_mode fast)

    # it reads as the sequence of layer scores, as score_layers' result did before it carried the statistics
    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> LayerScores:
        return self.layers[index]


def score_layers(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    owl_m: float = 5.0,
    device="cpu",
    batch_size: int = 8,
    keep_stats: bool = False,
    memory: str = "auto",
) -> Scoring:
    """Dense sweep (nothing is pruned): the layer scores every allocator needs.

    With ``keep_stats``, every Linear's input statistics are returned too, under its full name, so that
    ``prune_model(mode="fast")`` can prune from them without a second sweep.
    """
    scoring = Scoring([], {} if keep_stats else None)
    prefix, _ = find_decoder_layers(model)

    def visit(ctx: LayerContext) -> torch.Tensor:
        cosines: list[torch.Tensor] = []
        with collect_input_stats(ctx.linears) as stats:
            outputs = ctx.forward(on_batch=lambda x, y: cosines.append(token_cosines(x, y)))
        scoring.layers.append(_layer_score(ctx, stats, torch.cat(cosines), owl_m))
        if scoring.stats is not None:
            scoring.stats.update({f"{prefix}.{ctx.index}.{name}": st for name, st in stats.items()})
        return outputs

    sweep(model, input_ids, visit, device=device, batch_size=batch_size, desc="scoring layers", memory=memory)
    return scoring
