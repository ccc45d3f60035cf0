"""Pruning criteria and sparsity patterns, as pure functions of a weight and its input statistics, and the
registry that names them.

Masks are boolean with ``True`` = keep, so a pruned weight is ``W * mask`` and a merged LoRA weight is
``(W + s·B·A) * mask``. Ties are broken by column index (stable sorts), so a seed gives bit-identical masks.

Adding a criterion is one :func:`register_criterion` call where it is defined (its name, what it needs from
calibration, and the function that prunes one weight), as allocators (:func:`dlp.allocate.register_allocator`) and
compression methods (:func:`dlp.stages.method.register`) register: the recipe's ``criterion`` choices, the sweep's
statistics and the prune modes it may run in are all looked up in :data:`CRITERIA`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import require
from .stats import InputStats
from .projections import logical_weight


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` (per output row, as Wanda) or N:M (keep at most N weights in every M consecutive inputs)."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern fixes, or None for unstructured."""
        return 1.0 - self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_pattern(text: str) -> Pattern:
    if text == "unstructured":
        return Pattern()
    n_text, sep, m_text = text.partition(":")
    ok = sep == ":" and n_text.isdigit() and m_text.isdigit() and 0 < int(n_text) < int(m_text)
    require(ok, f"pattern must be 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4' or '4:8' (got {text!r})")
    return Pattern(int(n_text), int(m_text))


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖ (up to one constant per layer): the Wanda importance of every weight."""
    return weight.detach().abs().float() * sq_mean.to(weight.device).float().sqrt().unsqueeze(0)


def row_drop_counts(rows: int, cols: int, sparsity: float) -> tuple[int, int]:
    """(weights every row drops, rows that drop one more) for ``round(rows·cols·sparsity)`` drops in all."""
    return divmod(int(round(rows * cols * sparsity)), rows)


def rowwise_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Drop the lowest-scoring weights of every output row (Wanda's comparison group), ``round(rows·in·sparsity)``
    in all, so the matrix hits ``sparsity`` to one weight.

    Every row drops ``total // rows`` weights; the ``total % rows`` remaining drops go to the rows whose next
    candidate has the lowest score (ties: the first rows). Rounding each row alone (the research scripts' int(in·s))
    would miss the target by up to half a column per row: 1.6 points on a 32-wide toy, about 0.1 on SmolLM2.
    """
    rows, cols = scores.shape
    base, extra = row_drop_counts(rows, cols, sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if base == 0 and extra == 0:
        return keep
    order = torch.sort(scores, dim=1, stable=True).indices
    keep.scatter_(1, order[:, :base], False)
    if extra:
        candidates = order[:, base]
        next_scores = scores.gather(1, candidates.unsqueeze(1)).squeeze(1)
        chosen = torch.sort(next_scores, stable=True).indices[:extra]
        keep[chosen, candidates[chosen]] = False
    return keep


def nm_keep_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the ``n`` highest-scoring weights in each group of ``m`` consecutive input columns."""
    rows, cols = scores.shape
    require(cols % pattern.m == 0, f"pattern {pattern}: in_features={cols} is not a multiple of {pattern.m}")
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : pattern.n], True)
    return keep.reshape(rows, cols)


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    return nm_keep_mask(scores, pattern) if pattern.is_nm else rowwise_keep_mask(scores, sparsity)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2023): choose the mask block by block with the OBS saliency
    w²/[H⁻¹]²_jj and update the remaining weights to compensate the error. Returns (new weight, keep mask).

    Unstructured masks are chosen per block of ``blocksize`` columns over the whole block (as the paper
    does), with an exact count, so every block and the whole matrix hit ``sparsity``.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone().to(W.device)
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(cols, device=H.device) * (percdamp * torch.diag(H).mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        if pattern.is_nm:  # chosen group by group below, from the weights already compensated
            block_pruned = torch.zeros_like(W1, dtype=torch.bool)
        else:
            block_pruned = _lowest(W1.pow(2) / torch.diag(Hinv1).pow(2).unsqueeze(0), sparsity)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                saliency = W1[:, group].pow(2) / torch.diag(Hinv1)[group].pow(2).unsqueeze(0)
                block_pruned[:, group] = ~nm_keep_mask(saliency, pattern)
            w, d = W1[:, i], Hinv1[i, i]
            q = torch.where(block_pruned[:, i], torch.zeros_like(w), w)
            err[:, i] = (w - q) / d
            W1[:, i:] -= err[:, i : i + 1] @ Hinv1[i : i + 1, i:]
            W1[:, i] = q
        W[:, i1:i2] = W1
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
        pruned[:, i1:i2] = block_pruned
    keep = ~pruned
    W *= keep
    return W.to(weight.dtype), keep


def _lowest(saliency: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask of exactly round(numel·sparsity) lowest entries (ties by position)."""
    count = int(round(saliency.numel() * sparsity))
    flat = torch.zeros(saliency.numel(), dtype=torch.bool, device=saliency.device)
    if count > 0:
        flat[torch.sort(saliency.flatten(), stable=True).indices[:count]] = True
    return flat.view_as(saliency)


def check_sparsity(sparsity: float, name: str = "sparsity") -> None:
    require(0.0 <= sparsity < 1.0 and not math.isnan(sparsity), f"{name} must be in [0, 1) (got {sparsity})")


@dataclass(frozen=True)
class PruneSpec:
    """How to prune each Linear once its layer's sparsity is known."""

    criterion: str = "wanda"
    pattern: Pattern = Pattern()
    sparsegpt_blocksize: int = 128
    sparsegpt_percdamp: float = 0.01

    @property
    def needs_xtx(self) -> bool:
        return get_criterion(self.criterion).needs_hessian


PruneFn = Callable[[torch.Tensor, "InputStats | None", float, PruneSpec], torch.Tensor]
ScoreFn = Callable[[torch.Tensor, "InputStats | None"], torch.Tensor]


@dataclass(frozen=True)
class Criterion:
    """A pruning criterion: what it needs from the calibration sweep, and ``prune(weight, stats, sparsity, spec)``,
    which prunes one logical ``[out, in]`` weight in place and returns its keep-mask."""

    name: str
    prune: PruneFn
    needs_data: bool = True  # False: the weights alone decide (no calibration sweep at all)
    needs_hessian: bool = False  # True: the sweep accumulates XᵀX per Linear (SparseGPT's Hessian)
    # ``scores(weight, stats)``: one importance per weight, when the mask at any sparsity is "drop the lowest per
    # row" (so the masks of all sparsities are nested and come from one ranking; the searched allocation's level
    # database relies on it). None for a criterion that also changes the weights it keeps (SparseGPT).
    scores: ScoreFn | None = None

    @property
    def supports_fast(self) -> bool:
        """prune_mode fast prunes every Linear from statistics the dense scoring sweep kept, all at once. A Hessian
        per Linear for the whole model would not fit in memory beside it, so a criterion that needs one cannot."""
        return not self.needs_hessian


def _prune_by_scores(scores: ScoreFn) -> PruneFn:
    def prune(weight: torch.Tensor, stats, sparsity: float, spec: PruneSpec) -> torch.Tensor:
        keep = keep_mask(scores(weight, stats), sparsity, spec.pattern)
        weight.mul_(keep.to(weight.dtype))
        return keep

    return prune


def _prune_sparsegpt(weight: torch.Tensor, stats, sparsity: float, spec: PruneSpec) -> torch.Tensor:
    # contiguous: a Conv1D's transposed view would otherwise carry its strides into every matmul of the solver,
    # and a different BLAS path could round differently from the same Linear's
    new_weight, keep = sparsegpt_prune(
        weight.contiguous(), stats.hessian, sparsity, spec.pattern, spec.sparsegpt_blocksize, spec.sparsegpt_percdamp
    )
    weight.copy_(new_weight)
    return keep


def _by_scores(name: str, scores: ScoreFn, needs_data: bool = True) -> Criterion:
    """A criterion that drops the lowest ``scores`` of every row (or N:M group) and changes nothing else."""
    return Criterion(name, _prune_by_scores(scores), needs_data=needs_data, scores=scores)


CRITERIA: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion) -> Criterion:
    """Make ``criterion`` a value of the recipe's ``criterion`` (called where the criterion is defined)."""
    CRITERIA[criterion.name] = criterion
    return criterion


register_criterion(_by_scores("magnitude", lambda weight, _stats: magnitude_scores(weight), needs_data=False))
register_criterion(_by_scores("wanda", lambda weight, stats: wanda_scores(weight, stats.sq_mean)))
register_criterion(Criterion("sparsegpt", _prune_sparsegpt, needs_hessian=True))


def get_criterion(name: str) -> Criterion:
    require(name in CRITERIA, f"criterion must be one of {', '.join(CRITERIA)} (got {name!r})")
    return CRITERIA[name]


@torch.no_grad()
def prune_linear(linear: nn.Module, stats: InputStats | None, sparsity: float, spec: PruneSpec) -> torch.Tensor:
    """Prune one projection (Linear or Conv1D) in place; return its keep-mask [out, in] (on CPU).

    Every criterion works on the logical ``[out, in]`` weight (for a Conv1D a transposed view of the stored one,
    which the in-place updates write through), so Wanda's per-output-row groups and SparseGPT's input columns
    mean the same thing for both layouts."""
    return get_criterion(spec.criterion).prune(logical_weight(linear), stats, sparsity, spec).cpu()
