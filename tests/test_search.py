"""The searched allocation (dlp/search.py): level grid and mutation, the level database against direct pruning,
the fitness, and the search through train/prune.py (resumed after kill -9 to the same result)."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, save_tiny_model, tiny_model
from test_prune_lora import ENV, run
from dlp.allocate import AllocationRequest, weighted_mean
from dlp.config import PruneArguments
from dlp.criteria import PruneSpec, rowwise_keep_mask
from dlp.errors import DlpError
from dlp.masks import MaskSet
from dlp.pruner import layer_param_counts, prune_model
from dlp.scoring import score_layers
from dlp.search import Assembler, KlFitness, LevelDatabase, LevelGrid, SearchPlan, drop_levels, search_allocation

PRUNE = REPO / "train" / "prune.py"


def test_drop_levels_hand_case():
    """Two rows of four. At 25% each row drops its lowest; at 37.5% (3 drops) the extra goes to the row whose
    next candidate scores lower (row 1: 0.2 < 0.3); at 50% both drop two."""
    scores = torch.tensor([[0.4, 0.1, 0.3, 0.9], [0.2, 0.8, 0.05, 0.7]])
    drop = drop_levels(scores, [0.25, 0.375, 0.5])
    assert drop.tolist() == [[3, 0, 2, 3], [1, 3, 0, 3]]  # 3: kept at every level


@pytest.mark.parametrize("shape", [(13, 37), (64, 16), (1, 50)])
def test_drop_levels_reproduce_the_criterion_mask_at_every_level(shape):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    scores[0, : shape[1] // 3] = 0.5  # ties, broken by column as the criterion does
    sparsities = [0.05 + 0.031 * i for i in range(29)]
    drop = drop_levels(scores, sparsities)
    for index, sparsity in enumerate(sparsities):
        assert torch.equal(drop > index, rowwise_keep_mask(scores, sparsity)), sparsity


def test_grid_levels_quantize_and_mutation_keep_the_weighted_total():
    params = [1000, 1000, 3000, 500]
    grid = LevelGrid.around(0.7, params, 0.01, 25, 0.95)
    assert grid.step == 14  # 1% of the mean layer (1375 weights), rounded
    for layer, p in enumerate(params):  # every level inside [0, 0.95], and as many as fit up to 25 a side
        assert grid.sparsity(layer, grid.low[layer]) >= 0 and grid.sparsity(layer, grid.high[layer]) <= 0.95
    assert grid.high[3] == 8  # 0.7 + 9·14/500 = 0.952 would pass 0.95
    levels = grid.quantize([0.6, 0.8, 0.7, 0.7])
    assert sum(levels) == 0 and weighted_mean(grid.sparsities(levels), params) == pytest.approx(0.7, abs=1e-12)
    assert levels[0] < 0 < levels[1]
    rng = random.Random(0)
    for _ in range(500):
        child = grid.mutate(levels, rng, 3)
        assert sum(child) == 0  # (two swaps may cancel: the search skips a child equal to its parent)
        assert all(lo <= k <= hi for k, lo, hi in zip(child, grid.low, grid.high))
        assert weighted_mean(grid.sparsities(child), params) == pytest.approx(0.7, abs=1e-12)
        assert sum(abs(a - b) for a, b in zip(child, levels)) <= 6  # at most three swaps


def _dense_stats(model, ids):
    return score_layers(model, ids, keep_stats=True, batch_size=2)


def test_an_assembled_allocation_equals_pruning_each_layer_at_its_level(calib_ids):
    """Bitwise, masks and weights: the database's candidate vs prune_model(mode=fast) at the same sparsities."""
    model = tiny_model("llama", layers=4)
    scoring = _dense_stats(model, calib_ids)
    params = layer_param_counts(model)
    grid = LevelGrid.around(0.6, params, 0.02, 10, 0.99)
    levels = (3, -5, 4, -2)
    database = LevelDatabase.build(model, scoring.stats, grid, "wanda")
    assembler = Assembler(model, database)
    assembler.apply((0, 0, 0, 0))
    assembler.apply(levels)  # a second candidate: only changed layers are rewritten
    assembled = {n: p.detach().clone() for n, p in model.named_parameters()}
    assembler.restore()
    direct = tiny_model("llama", layers=4)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))
    masks = prune_model(direct, None, grid.sparsities(levels), PruneSpec("wanda"), mode="fast", stats=scoring.stats)
    for name, param in direct.named_parameters():
        assert torch.equal(assembled[name], param), name
    for name, keep in masks.masks.items():
        layer = int(name.split(".")[2])
        assert torch.equal(database.keep(name, layer, levels[layer]), keep), name


def test_fitness_is_zero_for_the_dense_model_and_grows_with_pruning(calib_ids):
    model = tiny_model("llama")
    fitness = KlFitness(model, calib_ids, topk=16, batch_size=2, device=torch.device("cpu"))
    assert fitness(range(4)) == pytest.approx(0.0, abs=1e-4)
    scoring = _dense_stats(model, calib_ids)
    grid = LevelGrid.around(0.5, layer_param_counts(model), 0.05, 5, 0.99)
    assembler = Assembler(model, LevelDatabase.build(model, scoring.stats, grid, "wanda"))
    assembler.apply((0, 0, 0))
    half = fitness(range(4))
    assembler.apply((4, -4, 0))
    assert 0.0 < half and fitness(range(4)) != half


def test_search_settings_are_checked():
    for fields, message in (
        (dict(search_survivors="4,2"), "search_survivors must end with 1"),
        (dict(search_survivors="4,1", search_tokens="512"), "as many stages"),
        (dict(search_survivors="20,1"), "start at most at search_offspring=16"),
        (dict(search_tokens="4096,512"), "must not decrease"),
        (dict(search_tokens="a,b"), "search_tokens must be comma-separated positive integers"),
        (dict(search_levels=200), "search_levels must be at most 126"),
        (dict(search_step=0.5), r"search_step must be in \(0, 0.1\]"),
        (dict(search_precision="fp16"), "search_precision must be one of auto, bf16, float32"),
    ):
        with pytest.raises(DlpError, match=message):
            PruneArguments(allocation="search", **fields)
    assert SearchPlan.from_settings(PruneArguments(allocation="search")).tokens == (1024, 8192)


def test_search_returns_exact_levels_and_never_ends_worse_than_its_start(calib_ids, tmp_path):
    model = tiny_model("llama", layers=4)
    settings = PruneArguments(
        allocation="search", sparsity=0.6, search_generations=6, search_offspring=4, search_survivors="2,1",
        search_tokens="32,64", search_step=0.02, search_levels=8,
    )  # fmt: skip
    scoring = _dense_stats(model, calib_ids)
    params = layer_param_counts(model)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    request = AllocationRequest(
        settings, scoring.layers, params, model=model, input_ids=calib_ids, stats=scoring.stats, out=tmp_path
    )
    sparsities = search_allocation(request)
    assert weighted_mean(sparsities, params) == pytest.approx(0.6, abs=1e-12)
    assert all(torch.equal(p, dense[n]) for n, p in model.named_parameters()), "the model is left dense"
    state = json.loads((tmp_path / "search" / "state.json").read_text())
    assert state["generation"] == 6 and len(state["history"]) == 6
    assert state["final"]["fitness"] <= state["final"]["start_fitness"]
    saved = json.loads((tmp_path / "search" / "allocation.json").read_text())
    assert saved["sparsities"] == sparsities and saved["start"] in ("uniform", "owl", "dlp", "lr")
    assert (tmp_path / "search" / "fitness.png").is_file() and (tmp_path / "search" / "sparsities.png").is_file()
    assert search_allocation(request) == sparsities  # finished: read back, nothing measured again


SEARCH_FLAGS = [
    "--dtype", "float32", "--calibration_data", "builtin:wikitext2-valid", "--nsamples", "8", "--seqlen", "32",
    "--sparsity", "0.7", "--allocation", "search", "--prune_mode", "fast", "--eval_seqlen", "32",
    "--eval_max_windows", "2", "--search_generations", "30", "--search_offspring", "8", "--search_tokens",
    "64,128", "--search_step", "0.02", "--search_levels", "10", "--seed", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def search_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-6"), "llama", layers=6)


def _search_args(model_dir: Path, out: Path) -> list[str]:
    return [sys.executable, str(PRUNE), "--model_name_or_path", str(model_dir), *SEARCH_FLAGS, "--output_dir", str(out)]


def _kill_after_generation(args: list[str], state_file: Path, generation: int, timeout: float = 300) -> None:
    import signal
    import subprocess

    proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        try:
            if json.loads(state_file.read_text())["generation"] >= generation:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_killed_search_resumes_to_the_same_result(search_model_dir, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = run(_search_args(search_model_dir, whole))
    assert done.returncode == 0, done.stderr[-2000:]
    _kill_after_generation(_search_args(search_model_dir, killed), killed / "search" / "state.json", 3)
    state = json.loads((killed / "search" / "state.json").read_text())
    assert 3 <= state["generation"] < 30 and not (killed / "report.json").exists(), "not killed mid-search"
    done = run(_search_args(search_model_dir, killed))
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = (json.loads((d / "search" / "allocation.json").read_text()) for d in (killed, whole))
    drop = ("search_s",)
    assert {k: v for k, v in ours.items() if k not in drop} == {k: v for k, v in theirs.items() if k not in drop}
    assert MaskSet.load(killed / "masks.safetensors").digest() == MaskSet.load(whole / "masks.safetensors").digest()
    report = json.loads((whole / "report.json").read_text())
    assert report["allocation_details"]["generations"] == 30
    assert report["layer_sparsity"]["allocated"] == theirs["sparsities"]
    assert "Allocation searched for" in (whole / "summary.md").read_text()


def test_the_pipeline_searches_once_and_trains_on_every_rank(tiny_model_dir, tmp_path):
    """prune → mask-exact LoRA → merge → export with ``allocation: search`` under DDP: one search (the main process
    prunes; the other rank waits and loads the masks), the masks a one-process prune run finds, exact merge."""
    from test_distributed import launch
    from test_prune_lora import write_recipe

    search = dict(
        allocation="search", prune_mode="fast", search_generations=4, search_offspring=4, search_survivors="2,1",
        search_tokens="32,64", search_step=0.02, search_levels=8,
    )  # fmt: skip
    recipe = write_recipe(
        tmp_path / "recipe.yaml", tiny_model_dir, max_steps=4, per_device_train_batch_size=1, **search
    )
    result = launch("ddp.yaml", recipe, tmp_path / "run")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert result.stdout.count("[dlp] search: KL") == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["merge"]["violations"] == 0 and report["export"]["reloaded_violations"] == 0
    pruning = ("model_name_or_path", "dtype", "calibration_data", "nsamples", "seqlen", "sparsity", "criterion",
               "eval_seqlen", "eval_max_windows", "seed", *search)  # fmt: skip
    fields = {k: v for k, v in (line.split(": ", 1) for line in recipe.read_text().splitlines()) if k in pruning}
    alone_recipe = tmp_path / "prune.yaml"
    alone_recipe.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
    alone = run([sys.executable, str(PRUNE), "--config", str(alone_recipe), "--output_dir", str(tmp_path / "alone")])
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert report["masks_digest"] == MaskSet.load(tmp_path / "alone" / "masks.safetensors").digest()


def test_sparsegpt_searches_on_wanda_masks_and_magnitude_on_its_own(calib_ids):
    """SparseGPT's masks are not nested (and its kept weights change per level): its database is Wanda's."""
    model = tiny_model("llama")
    stats = _dense_stats(model, calib_ids).stats
    grid = LevelGrid.around(0.5, layer_param_counts(model), 0.05, 5, 0.99)
    wanda, sparsegpt, magnitude = (
        LevelDatabase.build(model, stats, grid, c) for c in ("wanda", "sparsegpt", "magnitude")
    )
    assert all(torch.equal(wanda.drops[n], sparsegpt.drops[n]) for n in wanda.drops)
    weight = model.model.layers[1].mlp.up_proj.weight.detach()
    for level in (-3, 0, 4):
        expected = rowwise_keep_mask(weight.abs().float(), grid.sparsity(1, level))
        assert torch.equal(magnitude.keep("model.layers.1.mlp.up_proj", 1, level), expected)
