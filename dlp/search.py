"""Searched layerwise allocation (``allocation: search``): measure candidate allocations instead of scoring layers.

After EvoPress (Sieberling et al., ICML 2025). DLP, OWL and LR each turn one statistic per layer into sparsities
in one pass, and which of them is best changes from model to model; the search ranks allocations by what they do
to the model's output. Three parts:

* A **level grid** (:class:`LevelGrid`). Layer l may take a level k in [low_l, high_l], meaning sparsity
  t + k·Δ/P_l: t the target, P_l the layer's prunable weights, Δ a fixed number of weights (``search_step`` of a
  mean layer). One level up in one layer and one down in another then moves exactly Δ weights, so every candidate
  prunes as many weights as the target, whatever the layer sizes.
* A **level database** (:class:`LevelDatabase`). Wanda and magnitude drop the lowest scores of each row, so a
  Linear's masks at increasing sparsity are nested and all come from one ranking. The database keeps one byte per
  weight, the index of the first level that drops it: the masks of all of a layer's levels (up to 254) in the
  space of eight bit-packed masks. The mask at level i is ``drop > i``, bitwise the mask the criterion gives at
  that level's sparsity from the dense sweep's statistics (``prune_mode: fast``), so a candidate is assembled
  (``dense ⊙ mask`` copied into the layers whose level changed), never re-scored. SparseGPT's masks are not
  nested and the weights it keeps change with the level (a copy of the model per level): with it, the database
  holds Wanda masks, the search ranks allocations by them, and SparseGPT prunes at the searched sparsities.
* The **search** (:func:`search_allocation`): an elitist (1 + λ) evolution. It starts from the best one-pass
  allocation (uniform, OWL, DLP, LR with the recipe's settings, each put on the grid and ranked by the same
  fitness). Each generation makes ``search_offspring`` distinct mutants (1–``search_max_swaps`` one-level swaps
  between two layers, fewer more likely, as EvoPress draws them) and selects in stages on growing numbers of
  calibration tokens (``search_tokens``, ``search_survivors``); the parent joins the last stage, so it is replaced
  only by a mutant that beats it on the same tokens. At the end the result and the start are measured on every
  calibration window and the better one is returned, so the search never ends worse (by its fitness) than it began.

**Fitness**: the mean per-token KL(dense ‖ candidate) of next-token distributions on calibration windows only
(never the evaluation text), over the dense model's top-k tokens plus one tail bucket for the rest of the
vocabulary (:func:`dlp.distill.support_kl`); the dense targets are computed once. Forwards run in bf16 autocast
where the device has bf16 matrix units (CUDA, CPUs with AMX), targets included (``search_precision: auto``); a
machine without them computes in float32 and may find another allocation, so ``search_precision: float32`` (or
``bf16``) pins the search across machines.

**State**: ``output_dir/search/state.json`` is written atomically after every generation; its random draws depend
only on (seed, generation), so a killed search resumes to the same result. It stops after ``search_generations``
or ``search_time_budget`` seconds (counted across resumes), whichever comes first; a rerun with a larger budget
continues. The result is ``search/allocation.json`` (usable as ``allocation: explicit`` with
``layer_sparsities: <that file>``), ``search/fitness.png`` and ``search/sparsities.png``.

Only the process that prunes runs the search (in the pipeline, the main process; the other ranks wait at its
barrier and then load the masks).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocate import (
    ALLOCATORS,
    ONE_PASS_ALLOCATIONS,
    AllocationRequest,
    Allocator,
    balance,
    register_allocator,
)
from .criteria import get_criterion, row_drop_counts
from .distill import Targets, support_kl
from .errors import require
from .rundir import atomic_write_json, claim_dir, read_json
from .modeling import find_decoder_layers, find_linears, prunable_linears
from .process import cpu_has_bf16_matrix_units
from .projections import logical_weight

SEARCH_DIR = "search"
MAX_LEVELS = 254  # levels per layer a one-byte database entry can tell apart (255 = "kept at every level")


def parse_ints(text: str, name: str) -> list[int]:
    """A comma-separated list of positive integers from a recipe field (one-line error otherwise)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    require(values and all(v > 0 for v in values), f"{name} must be comma-separated positive integers (got {text!r})")
    return values


@dataclass(frozen=True)
class LevelGrid:
    """The sparsities each layer may take: level k of layer l is ``target + k·step/params[l]``."""

    target: float
    step: int  # weights moved by one level
    params: tuple[int, ...]
    low: tuple[int, ...]
    high: tuple[int, ...]

    @classmethod
    def around(
        cls, target: float, params: Sequence[int], step_fraction: float, num_levels: int, max_sparsity: float
    ) -> "LevelGrid":
        """Up to ``num_levels`` levels either side of the target, each ``step_fraction`` of a mean layer, inside
        [0, max_sparsity]."""
        step = max(1, round(step_fraction * sum(params) / len(params)))
        low, high = [], []
        for p in params:
            lo, hi = -num_levels, num_levels
            while target + lo * step / p < 0.0:
                lo += 1
            while target + hi * step / p > max_sparsity:
                hi -= 1
            low.append(lo)
            high.append(hi)
        return cls(target, step, tuple(params), tuple(low), tuple(high))

    @property
    def num_layers(self) -> int:
        return len(self.params)

    def sparsity(self, layer: int, level: int) -> float:
        return self.target + level * self.step / self.params[layer]

    def layer_levels(self, layer: int) -> list[float]:
        """The sparsities of all of ``layer``'s levels, lowest first (the database's level order)."""
        return [self.sparsity(layer, k) for k in range(self.low[layer], self.high[layer] + 1)]

    def sparsities(self, levels: Sequence[int]) -> list[float]:
        return [self.sparsity(layer, level) for layer, level in enumerate(levels)]

    def quantize(self, sparsities: Sequence[float]) -> tuple[int, ...]:
        """The levels nearest to ``sparsities`` whose sum is 0 (so exactly on target): floor each, then raise the
        layers furthest below their ideal level (or lower those furthest above) one level at a time."""
        ideal = [(s - self.target) * p / self.step for s, p in zip(sparsities, self.params)]
        levels = [min(max(math.floor(x), lo), hi) for x, lo, hi in zip(ideal, self.low, self.high)]
        while (total := sum(levels)) != 0:
            sign = -1 if total > 0 else 1
            room = [i for i in range(self.num_layers) if self.low[i] <= levels[i] + sign <= self.high[i]]
            require(room, "allocation search: the level grid cannot hold the target sparsity")
            layer = max(room, key=lambda i: (sign * (ideal[i] - levels[i]), -i))
            levels[layer] += sign
        return tuple(levels)

    def mutate(self, levels: Sequence[int], rng: random.Random, max_swaps: int) -> tuple[int, ...]:
        """1 to ``max_swaps`` swaps (fewer more likely): one layer one level down, another one level up."""
        child = list(levels)
        for _ in range(min(rng.randint(1, max_swaps), rng.randint(1, max_swaps))):
            down = [i for i in range(self.num_layers) if child[i] > self.low[i]]
            if not down:
                break
            lower = rng.choice(down)
            up = [i for i in range(self.num_layers) if child[i] < self.high[i] and i != lower]
            if not up:
                break
            raise_ = rng.choice(up)
            child[lower] -= 1
            child[raise_] += 1
        return tuple(child)


def drop_levels(scores: torch.Tensor, sparsities: Sequence[float]) -> torch.Tensor:
    """For each weight, the index of the first of ``sparsities`` (ascending) at which
    :func:`dlp.criteria.rowwise_keep_mask` drops it (``len(sparsities)``: never), as uint8.

    At sparsity s a row drops the ``base`` lowest-ranked weights, and ``extra`` rows (those whose next candidate
    scores lowest) one more; a weight at rank r is dropped at the first level whose ``base`` exceeds r, or earlier
    at a level where it is one of the extra drops."""
    require(len(sparsities) <= MAX_LEVELS, f"at most {MAX_LEVELS} levels per layer (got {len(sparsities)})")
    rows, cols = scores.shape
    order = torch.sort(scores, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cols, device=order.device).expand(rows, cols))
    counts = [row_drop_counts(rows, cols, s) for s in sparsities]
    bases = torch.tensor([base for base, _ in counts], device=order.device)
    drop = torch.searchsorted(bases, rank.flatten(), right=True).view(rows, cols)
    for index, (base, extra) in enumerate(counts):
        if extra:
            candidates = order[:, base]
            chosen = torch.sort(scores.gather(1, candidates[:, None]).squeeze(1), stable=True).indices[:extra]
            drop[chosen, candidates[chosen]] = drop[chosen, candidates[chosen]].clamp(max=index)
    return drop.to(torch.uint8)


class LevelDatabase:
    """Every prunable Linear's masks at all of its layer's levels, one byte per weight (see the module docstring)."""

    def __init__(self, grid: LevelGrid, drops: dict[str, torch.Tensor], layers: list[list[str]]):
        self.grid = grid
        self.drops = drops  # full Linear name -> uint8 [out, in]
        self.layers = layers  # per decoder layer: its Linears' full names

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        stats: dict[str, Any],
        grid: LevelGrid,
        criterion: str,
        device: torch.device | str = "cpu",
    ) -> "LevelDatabase":
        """Rank every Linear once by the criterion's scores (Wanda's for a criterion without nested masks), on
        ``device`` (the sorts are the cost); the database itself is kept on the host."""
        scorer = get_criterion(criterion).scores or get_criterion("wanda").scores
        prefix, decoder_layers = find_decoder_layers(model)
        drops: dict[str, torch.Tensor] = {}
        layers: list[list[str]] = []
        for index, layer in enumerate(tqdm(decoder_layers, desc="level database", unit="layer")):
            sparsities = grid.layer_levels(index)
            names = []
            for name, linear in find_linears(layer).items():
                full = f"{prefix}.{index}.{name}"
                weight = logical_weight(linear).detach().to(device)
                drops[full] = drop_levels(scorer(weight, stats.get(full)), sparsities).cpu()
                names.append(full)
            layers.append(names)
        return cls(grid, drops, layers)

    def keep(self, name: str, layer: int, level: int) -> torch.Tensor:
        """The keep-mask of Linear ``name`` (in decoder layer ``layer``) at ``level``."""
        return self.drops[name] > (level - self.grid.low[layer])

    @property
    def nbytes(self) -> int:
        return sum(d.numel() for d in self.drops.values())


class Assembler:
    """Puts a candidate allocation into the model: ``dense ⊙ mask`` into each layer whose level changed. The dense
    weights are kept on the host; :meth:`restore` puts them back."""

    def __init__(self, model: nn.Module, database: LevelDatabase):
        self.database = database
        self.linears = {name: module for name, module in model.named_modules() if name in database.drops}
        self.dense = {name: logical_weight(lin).detach().to("cpu", copy=True) for name, lin in self.linears.items()}
        self.current: list[int | None] = [None] * database.grid.num_layers

    @torch.no_grad()
    def apply(self, levels: Sequence[int]) -> None:
        for layer, level in enumerate(levels):
            if self.current[layer] == level:
                continue
            for name in self.database.layers[layer]:
                weight = logical_weight(self.linears[name])
                keep = self.database.keep(name, layer, level)
                weight.copy_((self.dense[name] * keep).to(weight.device, weight.dtype))
            self.current[layer] = level

    @torch.no_grad()
    def restore(self) -> None:
        for name, linear in self.linears.items():
            weight = logical_weight(linear)
            weight.copy_(self.dense[name].to(weight.device, weight.dtype))
        self.current = [None] * self.database.grid.num_layers


PRECISIONS = ("auto", "bf16", "float32")


def fitness_precision(precision: str, device: torch.device) -> str:
    """``search_precision``: ``auto`` is bf16 autocast where the device multiplies bf16 matrices natively (CUDA,
    CPUs with AMX: about twice as fast here), else float32. Set it to get the same search on different machines."""
    if precision != "auto":
        return precision
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_matrix_units())
    return "bf16" if native else "float32"


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


class KlFitness:
    """Mean per-token KL(dense ‖ model) on chosen calibration windows, over the dense top-k plus a tail bucket."""

    def __init__(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        topk: int,
        batch_size: int,
        device: torch.device,
        precision: str = "float32",
    ):
        self.model, self.input_ids, self.batch_size, self.device = model, input_ids, batch_size, device
        self.precision = precision  # bf16 (autocast) or float32, the dense targets' as well as every candidate's
        log_probs, indices = [], []
        for logits in self._logits(range(input_ids.shape[0]), "dense targets"):
            top = torch.log_softmax(logits.float(), dim=-1).topk(min(topk, logits.shape[-1]), dim=-1)
            log_probs.append(top.values.cpu())
            indices.append(top.indices.to("cpu", torch.int32))
        self.log_probs, self.indices = torch.cat(log_probs), torch.cat(indices)  # [windows, seqlen - 1, k]

    @torch.no_grad()
    def _logits(self, windows: Sequence[int], desc: str | None = None):
        windows = list(windows)
        batches = range(0, len(windows), self.batch_size)
        for start in tqdm(batches, desc=desc, unit="batch", leave=False) if desc else batches:
            ids = self.input_ids[windows[start : start + self.batch_size]].to(self.device)
            with _autocast(self.device, self.precision):
                yield self.model(input_ids=ids, use_cache=False).logits[:, :-1]

    def __call__(self, windows: Sequence[int]) -> float:
        windows = list(windows)
        total, count = 0.0, 0
        for start, logits in zip(range(0, len(windows), self.batch_size), self._logits(windows)):
            batch = windows[start : start + self.batch_size]
            targets = Targets(
                self.log_probs[batch].flatten(0, 1).to(self.device), self.indices[batch].flatten(0, 1).to(self.device)
            )
            total += _support_kl_sum(logits.flatten(0, 1), targets)
            count += targets.log_probs.shape[0]
        return total / count


def _support_kl_sum(logits: torch.Tensor, targets: Targets, rows: int = 512) -> float:
    """Σ over tokens of the top-k KL (:func:`dlp.distill.support_kl`) without materialising the log-softmax: per
    chunk of rows, a log-sum-exp and a gather (no gradients are needed here). On 8 × 512 SmolLM2 positions on the
    2-core CPU: 0.96 s against 1.10 s for :func:`dlp.distill.kl_sum`, a quarter of a fitness evaluation."""
    total = 0.0
    for start in range(0, logits.shape[0], rows):
        chunk = logits[start : start + rows]
        lse = torch.logsumexp(chunk.float(), dim=-1, keepdim=True)
        log_student = chunk.gather(-1, targets.indices[start : start + rows].long()).float() - lse
        total += float(support_kl(targets.log_probs[start : start + rows].float(), log_student).sum())
    return total


@dataclass(frozen=True)
class SearchPlan:
    """The search's own recipe fields (``search_*`` in :class:`dlp.config.PruneArguments`)."""

    generations: int = 200
    time_budget: float = 0.0  # seconds; 0: no limit
    offspring: int = 16
    survivors: tuple[int, ...] = (4, 1)
    tokens: tuple[int, ...] = (1024, 8192)
    step: float = 0.01
    levels: int = 25
    topk: int = 128
    max_swaps: int = 3
    precision: str = "auto"

    @classmethod
    def from_settings(cls, settings) -> "SearchPlan":
        return cls(
            generations=settings.search_generations,
            time_budget=settings.search_time_budget,
            offspring=settings.search_offspring,
            survivors=tuple(parse_ints(settings.search_survivors, "search_survivors")),
            tokens=tuple(parse_ints(settings.search_tokens, "search_tokens")),
            step=settings.search_step,
            levels=settings.search_levels,
            topk=settings.search_topk,
            max_swaps=settings.search_max_swaps,
            precision=settings.search_precision,
        )

    def check(self) -> None:
        """One-line errors for a plan that cannot run (called when the recipe is read)."""
        require(len(self.survivors) == len(self.tokens), "search_survivors and search_tokens must list as many stages")
        require(
            self.precision in PRECISIONS,
            f"search_precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})",
        )
        require(self.survivors[-1] == 1, f"search_survivors must end with 1 (got {list(self.survivors)})")
        require(
            all(a > b for a, b in zip(self.survivors, self.survivors[1:])) and self.survivors[0] <= self.offspring,
            f"search_survivors must decrease and start at most at search_offspring={self.offspring} "
            f"(got {list(self.survivors)})",
        )
        require(
            all(a <= b for a, b in zip(self.tokens, self.tokens[1:])),
            f"search_tokens must not decrease from stage to stage (got {list(self.tokens)})",
        )


@dataclass
class SearchState:
    """What ``search/state.json`` holds after each generation (everything a resumed search needs)."""

    key: str
    start: dict[str, Any]  # allocation (name), levels, candidates (name -> fitness on the start windows)
    parent: list[int]
    fitness: float  # the parent's fitness in its last selection
    generation: int = 0
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # generation, fitness, elapsed_s, levels
    final: dict[str, Any] | None = None  # levels, fitness, start_fitness, kept (on every calibration window)

    def save(self, directory: Path) -> None:
        atomic_write_json(directory / "state.json", self.__dict__)

    @classmethod
    def load(cls, directory: Path, key: str) -> "SearchState | None":
        data = read_json(directory / "state.json")
        return cls(**data) if isinstance(data, dict) and data.get("key") == key else None


def _windows(seed: int, generation: int, stage: int, tokens: int, nsamples: int, seqlen: int) -> list[int]:
    """The calibration windows of one selection stage: enough whole windows for ``tokens``, drawn from (seed,
    generation, stage) alone, so a resumed search draws what an uninterrupted one would."""
    count = min(nsamples, math.ceil(tokens / seqlen))
    return sorted(random.Random(f"{seed}:{generation}:{stage}").sample(range(nsamples), count))


@dataclass
class _Searcher:
    """The running search: grid, plan, fitness and assembler, and the state it advances."""

    grid: LevelGrid
    plan: SearchPlan
    fitness: KlFitness
    assembler: Assembler
    seed: int

    @property
    def nsamples(self) -> int:
        return self.fitness.input_ids.shape[0]

    def measure(self, candidates: Sequence[tuple[int, ...]], windows: list[int]) -> list[float]:
        scores = []
        for levels in candidates:
            self.assembler.apply(levels)
            scores.append(self.fitness(windows))
        return scores

    def stage_windows(self, generation: int, stage: int) -> list[int]:
        seqlen = self.fitness.input_ids.shape[1]
        return _windows(self.seed, generation, stage, self.plan.tokens[stage], self.nsamples, seqlen)

    def start(self, request: AllocationRequest, key: str) -> SearchState:
        """The best one-pass allocation by the fitness on the last stage's number of tokens."""
        settings = request.settings
        candidates: dict[str, tuple[int, ...]] = {}
        for name in ONE_PASS_ALLOCATIONS:
            raw = ALLOCATORS[name].raw(request)
            balanced = balance(raw, request.params, settings.sparsity, settings.max_layer_sparsity)
            candidates[name] = self.grid.quantize(balanced)
        windows = self.stage_windows(-1, len(self.plan.tokens) - 1)
        scores = dict(zip(candidates, self.measure(list(candidates.values()), windows)))
        best = min(candidates, key=lambda name: scores[name])  # ties: the first in ONE_PASS_ALLOCATIONS
        print("[dlp] search start: " + ", ".join(f"{n} {s:.4f}" for n, s in scores.items()) + f" -> {best}")
        start = {"allocation": best, "levels": list(candidates[best]), "candidates": scores}
        return SearchState(key, start, list(candidates[best]), scores[best])

    def generation(self, state: SearchState) -> None:
        """One generation: mutants of the parent, selected in stages; the parent joins the last stage first, so it
        stays on a tie."""
        parent = tuple(state.parent)
        rng = random.Random(f"{self.seed}:{state.generation}:mutate")
        offspring: list[tuple[int, ...]] = []
        for _ in range(50 * self.plan.offspring):  # a tiny grid may have fewer distinct mutants than asked for
            if len(offspring) == self.plan.offspring:
                break
            child = self.grid.mutate(parent, rng, self.plan.max_swaps)
            if child != parent and child not in offspring:
                offspring.append(child)
        candidates, fitness = offspring, state.fitness
        for stage, survive in enumerate(self.plan.survivors):
            if stage == len(self.plan.survivors) - 1:
                candidates = [parent] + [c for c in candidates if c != parent]
            scores = self.measure(candidates, self.stage_windows(state.generation, stage))
            ranked = sorted(range(len(candidates)), key=lambda i: (scores[i], i))[:survive]
            candidates, fitness = [candidates[i] for i in ranked], scores[ranked[0]]
        state.parent, state.fitness = list(candidates[0]), fitness
        state.generation += 1

    def finish(self, state: SearchState) -> None:
        """Measure the result and the start on every calibration window; keep the better (the start on a tie)."""
        if state.final is not None and state.final["parent"] == state.parent:
            return  # measured before a rerun (e.g. one killed after the search, before the masks were saved)
        everything = list(range(self.nsamples))
        result, start = self.measure([tuple(state.parent), tuple(state.start["levels"])], everything)
        kept = "search" if result < start else "start"
        state.final = {
            "parent": state.parent,
            "levels": state.parent if kept == "search" else state.start["levels"],
            "fitness": min(result, start),
            "search_fitness": result,
            "start_fitness": start,
            "kept": kept,
            "windows": len(everything),
        }


def _state_key(request: AllocationRequest, grid: LevelGrid, plan: SearchPlan) -> str:
    """What a saved search depends on: model weights and calibration data, the grid, the plan (but not its budget:
    a rerun with more generations or time continues), the criterion, the one-pass settings and the seed."""
    settings, model = request.settings, request.model
    weights = sum(float(logical_weight(module).detach().double().sum()) for module in prunable_linears(model).values())
    plan_fields = {k: v for k, v in plan.__dict__.items() if k not in ("generations", "time_budget")}
    data = {
        "grid": [grid.target, grid.step, grid.params, grid.low, grid.high],
        "plan": plan_fields,
        "criterion": settings.criterion,
        "one_pass": [settings.dlp_alpha, settings.dlp_statistic, settings.owl_lambda, settings.lr_spread],
        "scores": [score.__dict__ for score in request.scores] if request.scores else None,
        "seed": request.seed,
        "calibration": hashlib.sha256(request.input_ids.to("cpu", torch.int64).numpy().tobytes()).hexdigest(),
        "weights": repr(weights),
        "device": torch.device(request.device).type,  # fitness values are only comparable on one kind of device
        "precision": fitness_precision(plan.precision, torch.device(request.device)),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _evolve(searcher: _Searcher, state: SearchState, directory: Path) -> None:
    """Generations until the budget is spent, the state saved after each."""
    plan = searcher.plan
    bar = tqdm(total=plan.generations, initial=state.generation, desc="allocation search", unit="gen")
    bar.set_postfix(kl=f"{state.fitness:.4f}")
    while state.generation < plan.generations and (plan.time_budget <= 0 or state.elapsed_s < plan.time_budget):
        started = time.perf_counter()
        searcher.generation(state)
        state.elapsed_s += time.perf_counter() - started
        state.history.append(
            {
                "generation": state.generation,
                "fitness": state.fitness,
                "elapsed_s": state.elapsed_s,
                "levels": list(state.parent),
            }
        )
        state.save(directory)
        bar.update(1)
        bar.set_postfix(kl=f"{state.fitness:.4f}")
    bar.close()


def search_allocation(request: AllocationRequest) -> list[float]:
    """The searched per-layer sparsities (exactly on target); the model is left dense. See the module docstring."""
    settings = request.settings
    plan = SearchPlan.from_settings(settings)
    plan.check()
    require(request.out is not None, "allocation search needs an output_dir for its state")
    grid = LevelGrid.around(settings.sparsity, request.params, plan.step, plan.levels, settings.max_layer_sparsity)
    directory = claim_dir(Path(request.out) / SEARCH_DIR, "output_dir")
    key = _state_key(request, grid, plan)
    state = SearchState.load(directory, key)
    budget_left = state is None or (
        state.generation < plan.generations and (plan.time_budget <= 0 or state.elapsed_s < plan.time_budget)
    )
    if budget_left or state.final is None or state.final["parent"] != state.parent:
        state = _run(request, grid, plan, state, key, directory)
    return _publish(directory, grid, state, request)


def _run(
    request: AllocationRequest, grid: LevelGrid, plan: SearchPlan, state: SearchState | None, key: str, directory: Path
) -> SearchState:
    """Build the database and the dense targets, then start (or resume) and finish the search."""
    model, device = request.model, torch.device(request.device)
    home = next(model.parameters()).device
    started = time.perf_counter()
    database = LevelDatabase.build(model, request.stats, grid, request.settings.criterion, device)
    assembler = Assembler(model, database)
    model.to(device)
    try:
        precision = fitness_precision(plan.precision, device)
        fitness = KlFitness(model, request.input_ids, plan.topk, request.batch_size, device, precision)
        print(
            f"[dlp] search: level database {database.nbytes / 2**20:.0f} MiB "
            f"({max(h - lo + 1 for lo, h in zip(grid.low, grid.high))} levels a layer, {grid.step} weights a level), "
            f"dense targets top-{plan.topk}, {precision} forwards, setup {time.perf_counter() - started:.1f} s"
        )
        searcher = _Searcher(grid, plan, fitness, assembler, request.seed)
        if state is None:
            started = time.perf_counter()
            state = searcher.start(request, key)
            state.elapsed_s = time.perf_counter() - started
            state.save(directory)
        _evolve(searcher, state, directory)
        searcher.finish(state)
        state.save(directory)
    finally:
        assembler.restore()
        model.to(home)
    return state


def _publish(directory: Path, grid: LevelGrid, state: SearchState, request: AllocationRequest) -> list[float]:
    """``allocation.json`` and the two plots; returns the sparsities."""
    final = state.final
    sparsities = grid.sparsities(final["levels"])
    atomic_write_json(
        directory / "allocation.json",
        {
            "sparsities": sparsities,
            "levels": final["levels"],
            "step_weights": grid.step,
            "start": state.start["allocation"],
            "start_candidates": state.start["candidates"],
            "kept": final["kept"],
            "fitness": final["fitness"],
            "start_fitness": final["start_fitness"],
            "fitness_windows": final["windows"],
            "generations": state.generation,
            "search_s": state.elapsed_s,
        },
    )
    _plot(directory, grid, state, request)
    print(
        f"[dlp] search: KL {final['start_fitness']:.4f} ({state.start['allocation']}) -> {final['fitness']:.4f} "
        f"after {state.generation} generations, {state.elapsed_s:.0f} s"
    )
    return sparsities


def _plot(directory: Path, grid: LevelGrid, state: SearchState, request: AllocationRequest) -> None:
    """``fitness.png`` (the KL over the search) and ``sparsities.png`` (searched beside the start's and DLP's)."""
    from .report import finish_line_plot, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    times = [h["elapsed_s"] for h in state.history]
    values = [h["fitness"] for h in state.history]
    # each generation's figure is on that generation's own windows, hence the noise: a moving mean shows the trend
    window = max(1, len(values) // 10)
    ax.plot(times, values, ".", color="#9DB4D8", label="selection tokens of each generation")
    ax.plot(times, _moving_mean(values, window), color="#4C72B0", linewidth=1.4, label=f"mean of the last {window}")
    final = state.final
    if final is not None:
        end = times[-1] if times else 0.0
        ax.plot([0.0, end], [final["start_fitness"], final["search_fitness"]], "*", color="#C44E52", markersize=10,
                label=f"start and result, all {final['windows']} windows")  # fmt: skip
    title = f"allocation search: {state.generation} generations from {state.start['allocation']}"
    finish_line_plot(fig, ax, directory / "fitness.png", "search time (s)", "KL to dense", title)
    _plot_sparsities(directory, grid, state, request)


def _moving_mean(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(values))]


def _plot_sparsities(directory: Path, grid: LevelGrid, state: SearchState, request: AllocationRequest) -> None:
    from .report import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * grid.num_layers + 2), 3.6))
    layers = range(grid.num_layers)
    ax.bar(layers, [100 * s for s in grid.sparsities(state.final["levels"])], color="#4C72B0", label="searched")
    ax.plot(
        layers,
        [100 * s for s in grid.sparsities(state.start["levels"])],
        color="#55A868",
        marker=".",
        label=f"start ({state.start['allocation']})",
    )
    if request.scores:
        dlp = balance(ALLOCATORS["dlp"].raw(request), request.params, grid.target, request.settings.max_layer_sparsity)
        ax.plot(layers, [100 * s for s in dlp], color="#C44E52", marker=".", label="dlp")
    ax.axhline(100 * grid.target, color="grey", linestyle="--", linewidth=1.0)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity (%)")
    ax.set_title("per-layer sparsity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, directory / "sparsities.png")


def describe(out: Path) -> dict[str, Any] | None:
    """What the report records of a finished search in ``out`` (None: no search ran there)."""
    data = read_json(Path(out) / SEARCH_DIR / "allocation.json")
    return {k: v for k, v in data.items() if k != "sparsities"} if isinstance(data, dict) else None


register_allocator(Allocator("search", search_allocation, rebalance=False, needs_stats=True, describe=describe))
