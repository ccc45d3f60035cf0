"""Per-projection (Linear or Conv1D) input statistics, accumulated incrementally by forward pre-hooks (activations
are never stored).

* ``sq_sum``: running sum over tokens of x_j² per input column (float64), so ‖X_j‖² = ``sq_sum`` and the Wanda
  score is |W_ij|·sqrt(mean x_j²) — the mean only rescales every score of a layer by one constant.
* ``xtx``: running Xᵀ X (float32) for SparseGPT's Hessian H = 2 XᵀX / n.

Linears that read the same tensor (q/k/v, gate/up) share one computation: the hook remembers the last input
it reduced and reuses the result.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .projections import in_features


@dataclass
class InputStats:
    """Statistics of the inputs one Linear has seen."""

    in_features: int
    want_xtx: bool = False
    tokens: int = 0
    sq_sum: torch.Tensor | None = None
    xtx: torch.Tensor | None = None

    def add(self, reduced: "_Reduced") -> None:
        self.tokens += reduced.tokens
        self.sq_sum = reduced.sq_sum if self.sq_sum is None else self.sq_sum + reduced.sq_sum
        if self.want_xtx:
            self.xtx = reduced.xtx if self.xtx is None else self.xtx + reduced.xtx

    @property
    def sq_mean(self) -> torch.Tensor:
        """Mean of x_j² over all tokens seen (float32)."""
        return (self.sq_sum / max(self.tokens, 1)).float()

    @property
    def hessian(self) -> torch.Tensor:
        """SparseGPT's H = 2/n · XᵀX."""
        return self.xtx * (2.0 / max(self.tokens, 1))


@dataclass
class _Reduced:
    tokens: int
    sq_sum: torch.Tensor
    xtx: torch.Tensor | None


@dataclass
class _SharedReducer:
    """Reduces each distinct input tensor once, however many Linears read it."""

    last_input: torch.Tensor | None = None
    last: _Reduced | None = None
    cache_hits: int = field(default=0)

    def reduce(self, x: torch.Tensor, want_xtx: bool) -> _Reduced:
        if x is self.last_input and (self.last.xtx is not None or not want_xtx):
            self.cache_hits += 1
            return self.last
        values = x.detach().float()  # one float32 copy serves both statistics
        flat = values.reshape(-1, values.shape[-1])
        xtx = flat.T @ flat if want_xtx else None
        sq_sum = _window_sums(values).double().sum(0)
        self.last_input, self.last = x, _Reduced(flat.shape[0], sq_sum, xtx)
        return self.last


def _window_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-window sums of x_j² of a float32 ``x`` (one row per window, or one row for flat tokens).

    Summing each window in float32 and the windows in float64 makes the result independent of how many windows
    share a forward: a micro-batch of 8 gives the same bits as 8 forwards of one window, so the masks do not
    depend on ``batch_size`` on CPU (sequential pruning amplifies a last-bit difference into ~1% of mask bits)."""
    rows = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() > 2 else x.unsqueeze(0)
    return rows.pow(2).sum(1)


def stats_hook(stats: InputStats, reducer: _SharedReducer):
    def hook(_module: nn.Module, args: tuple) -> None:
        stats.add(reducer.reduce(args[0], stats.want_xtx))

    return hook


@contextmanager
def collect_input_stats(linears: dict[str, nn.Module], want_xtx: bool = False) -> Iterator[dict[str, InputStats]]:
    """Accumulate :class:`InputStats` for each projection while the block runs inside the ``with``.

    ``in_features`` comes from :func:`dlp.projections.in_features`: a Conv1D has no ``in_features`` attribute."""
    reducer = _SharedReducer()
    stats = {name: InputStats(in_features(lin), want_xtx) for name, lin in linears.items()}
    handles = [lin.register_forward_pre_hook(stats_hook(stats[name], reducer)) for name, lin in linears.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        reducer.last_input = reducer.last = None
