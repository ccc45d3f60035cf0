"""Searched allocation vs DLP on SmolLM2-135M, side by side in one run: perplexity, prune wall time, and the curve
of perplexity against search time.

    python benchmarks/search_allocation.py                                 # 70%
    python benchmarks/search_allocation.py --sparsities 0.6,0.7,0.8 -- --search_time_budget 600

For every sparsity, ``train/prune.py`` prunes with the SmolLM2 Wanda recipe twice, as users run it: ``allocation:
dlp`` (the recipe, sequential) and ``allocation: search`` (``prune_mode: fast``, whose masks are the search
database's; more ``train/prune.py`` flags for the search run after ``--``). Wall time is the prune stage's own
(``score_s + allocate_s + prune_s`` of each report: dense sweep, allocation or search, pruning), so loading and
the perplexity evaluations are left out of both. Then the curve: the allocation the search held after selected
generations (its start included), pruned from the same database and evaluated on the test text, which the search
never saw. Results: ``<out>/search.json`` and ``<out>/search.md``, ``<out>/curve-<sparsity>.png``.
Perplexity: 64 × 512 windows of WikiText-2 test; calibration and fitness: the recipe's 32 × 512 valid windows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlp.data import load_calibration  # noqa: E402
from dlp.evaluate import perplexity  # noqa: E402
from dlp.rundir import atomic_write_json  # noqa: E402
from dlp.modeling import load_model_and_tokenizer  # noqa: E402
from dlp.pruner import layer_param_counts  # noqa: E402
from dlp.scoring import score_layers  # noqa: E402
from dlp.search import Assembler, LevelDatabase, LevelGrid, SearchPlan  # noqa: E402
from dlp.config import PruneArguments  # noqa: E402

RECIPE = REPO / "recipes" / "smollm2-135m" / "dlp_wanda_70.yaml"
EVAL_DATA = "builtin:wikitext2-test"  # the recipe's evaluation text, 64 × 512 windows


def prune(out: Path, name: str, flags: list[str]) -> dict:
    """One train/prune.py run (skipped when its report exists); its report."""
    run_dir = out / name
    if not (run_dir / "report.json").is_file():
        command = [sys.executable, "train/prune.py", "--config", str(RECIPE), "--output_dir", str(run_dir), *flags]
        with (out / f"{name}.log").open("w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        if done.returncode != 0:
            sys.exit(f"error: {name} failed, see {out / f'{name}.log'}")
    return json.loads((run_dir / "report.json").read_text())


def wall(report: dict) -> float:
    return sum(report["timings"].get(key, 0.0) for key in ("score_s", "allocate_s", "prune_s"))


def curve(run_dir: Path, report: dict, points: int) -> list[dict]:
    """Test perplexity of the search's parent at ``points`` generations (its start first, its result last)."""
    config = report["config"]
    settings = PruneArguments(**{k: v for k, v in config.items() if k in PruneArguments.__dataclass_fields__})
    model, tokenizer = load_model_and_tokenizer(report["model"], config.get("dtype") or "float32", "sdpa")
    calibration = load_calibration(
        tokenizer, config["calibration_data"], config["nsamples"], config["seqlen"], config["seed"]
    )
    stats = score_layers(model, calibration.input_ids, keep_stats=True, batch_size=config["calibration_batch_size"])
    plan = SearchPlan.from_settings(settings)
    grid = LevelGrid.around(
        settings.sparsity, layer_param_counts(model), plan.step, plan.levels, settings.max_layer_sparsity
    )
    assembler = Assembler(model, LevelDatabase.build(model, stats.stats, grid, settings.criterion))
    state = json.loads((run_dir / "search" / "state.json").read_text())
    history = state["history"]
    chosen = sorted({round(i * (len(history) - 1) / max(1, points - 1)) for i in range(points)}) if history else []
    marks = [(0, 0.0, state["start"]["levels"])] + [
        (history[i]["generation"], history[i]["elapsed_s"], history[i]["levels"]) for i in chosen
    ]
    rows = []
    for generation, elapsed, levels in marks:
        assembler.apply(levels)
        ppl = perplexity(model, tokenizer, EVAL_DATA, seqlen=512, max_windows=64).value
        rows.append({"generation": generation, "search_s": elapsed, "ppl": ppl})
        print(f"  generation {generation:4d} ({elapsed:6.0f} s): {ppl:.2f}", flush=True)
    return rows


def plot(path: Path, rows: list[dict], dlp_ppl: float, sparsity: float) -> None:
    from dlp.report import finish_line_plot, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    ax.plot([r["search_s"] for r in rows], [r["ppl"] for r in rows], marker="o", color="#4C72B0", label="search")
    ax.axhline(dlp_ppl, color="#C44E52", linestyle="--", label=f"DLP {dlp_ppl:.1f}")
    ax.axhline(0.8 * dlp_ppl, color="grey", linestyle=":", label="0.8 × DLP")
    title = f"SmolLM2-135M, Wanda {sparsity:.0%}: perplexity over the search"
    finish_line_plot(fig, ax, path, "search time (s)", "WikiText-2 test perplexity", title)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| sparsity | DLP ppl | search start | search ppl | ratio | DLP prune s | search prune s | time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sparsity']:.0%} | {r['dlp_ppl']:.2f} | {r['start']} {r['start_ppl']:.2f} | {r['search_ppl']:.2f} "
            f"| {r['search_ppl'] / r['dlp_ppl']:.3f} | {r['dlp_s']:.0f} | {r['search_s']:.0f} "
            f"| {r['search_s'] / r['dlp_s']:.1f}× |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.7")
    parser.add_argument("--points", type=int, default=6, help="curve points besides the start")
    parser.add_argument("--out", default="outputs/search_allocation")
    parser.add_argument("extra", nargs="*", help="more train/prune.py flags for the search run, after --")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        dlp = prune(out, f"dlp-{sparsity:g}", ["--sparsity", str(sparsity)])
        flags = ["--sparsity", str(sparsity), "--allocation", "search", "--prune_mode", "fast", *args.extra]
        search = prune(out, f"search-{sparsity:g}", flags)
        points = curve(out / f"search-{sparsity:g}", search, args.points)
        dlp_ppl = dlp["perplexity"]["pruned"]["value"]
        plot(out / f"curve-{sparsity:g}.png", points, dlp_ppl, sparsity)
        details = search["allocation_details"]
        rows.append(
            {
                "sparsity": sparsity,
                "dlp_ppl": dlp_ppl,
                "start": details["start"],
                "start_ppl": points[0]["ppl"],
                "search_ppl": search["perplexity"]["pruned"]["value"],
                "dlp_s": wall(dlp),
                "search_s": wall(search),
                "generations": details["generations"],
                "kept": details["kept"],
                "curve": points,
            }
        )
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    atomic_write_json(out / "search.json", {"rows": rows})
    (out / "search.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
