"""Does an allocation's lead survive recovery? Pruned and recovered perplexity per allocation, sparsity and loss.

    python benchmarks/recovery_table.py                                  # 70% and 80%; uniform, DLP, LR; 3 losses
    python benchmarks/recovery_table.py --sparsities 0.7 --losses plain,online --max_steps 72

For every (sparsity, allocation) the model is pruned once (``train/prune.py`` with the SmolLM2 Wanda recipe);
every loss then recovers *those* masks with ``train/prune_lora.py`` on the CPU default recipe
(``--prune_dir``), at the same token budget (``--max_steps``, the recipe's batch and window length):

* ``plain``: the LM loss (``teacher: none``);
* ``online`` / ``cached``: distillation from the dense model, ``(1 − w)·LM + w·T²·KL`` with the dense model
  run beside the student, or its top-k log-probabilities cached first (``--distill_weight``,
  ``--distill_temperature``, ``--top_k``).

The entry scripts are the ones users run, so each cell is a real run directory under ``--out``, resumable: a
rerun skips cells whose ``report.json`` exists. The table goes to ``<out>/table.json`` and ``<out>/table.md``.
Perplexity: 64 × 512 windows of WikiText-2 test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dlp.distill import CACHE_DIR  # noqa: E402
from dlp.rundir import atomic_write_json, claim_dir  # noqa: E402

PRUNE_RECIPE = REPO / "recipes" / "smollm2-135m" / "dlp_wanda_70.yaml"
LORA_RECIPE = REPO / "recipes" / "smollm2-135m" / "dlp_wanda_70_lora.yaml"
ALLOCATIONS = ("uniform", "dlp", "lr")
LOSSES = ("plain", "online", "cached")


def run(command: list[str], log: Path) -> None:
    """One entry-script run, its output in ``log``; a failure stops the table with the log's last line."""
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode != 0:
        lines = log.read_text().strip().splitlines() or ["(no output)"]
        sys.exit(f"error: {' '.join(command[1:3])} failed ({log}): {lines[-1]}")


def prune(out: Path, allocation: str, sparsity: float) -> Path:
    run_dir = out / f"prune-{allocation}-{sparsity:g}"
    if not (run_dir / "report.json").is_file():
        command = [sys.executable, "train/prune.py", "--config", str(PRUNE_RECIPE), "--allocation", allocation]
        command += ["--sparsity", str(sparsity), "--output_dir", str(run_dir)]
        run(command, out / f"prune-{allocation}-{sparsity:g}.log")
    return run_dir


def loss_flags(loss: str, args) -> list[str]:
    if loss == "plain":
        return ["--teacher", "none"]
    flags = ["--teacher", "dense", "--teacher_mode", loss, "--distill_weight", str(args.distill_weight)]
    flags += ["--distill_temperature", str(args.distill_temperature)]
    return flags + (["--distill_top_k", str(args.top_k)] if loss == "cached" else [])


def reuse_teacher_cache(out: Path, run_dir: Path) -> None:
    """Start a cached cell from a finished cell's teacher cache. The cache holds the dense teacher's top-k on the
    training windows, which are the same for every cell (the windows, the teacher, k and T make its key), so
    computing it once saves about 10 minutes a cell; the pipeline checks the key and rebuilds on a mismatch."""
    if (run_dir / CACHE_DIR).exists():
        return
    for manifest in sorted(out.glob(f"*-cached-*/{CACHE_DIR}/manifest.json")):
        shutil.copytree(manifest.parent, claim_dir(run_dir) / CACHE_DIR)
        return


def recover(out: Path, prune_dir: Path, name: str, loss: str, args) -> dict:
    run_dir = out / name
    if not (run_dir / "report.json").is_file():
        if loss == "cached":
            reuse_teacher_cache(out, run_dir)
        command = [sys.executable, "train/prune_lora.py", "--config", str(LORA_RECIPE), "--prune_dir", str(prune_dir)]
        command += ["--output_dir", str(run_dir), "--max_steps", str(args.max_steps), "--eval_dense", "false"]
        command += [*loss_flags(loss, args), *args.extra]
        start = time.perf_counter()
        run(command, out / f"{name}.log")
        print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)
    report = json.loads((run_dir / "report.json").read_text())
    return {
        "pruned": report["perplexity"]["pruned"]["value"],
        "recovered": report["perplexity"]["finetuned"]["value"],
        "train_s": report["timings"]["train_s"],
        "tokens": report["training"]["tokens_seen"],
    }


def markdown(rows: list[dict], losses: list[str]) -> str:
    header = "| sparsity | allocation | pruned | " + " | ".join(f"+ recovery, {loss}" for loss in losses) + " |"
    lines = [header, "|" + "---|" * (3 + len(losses))]
    for row in rows:
        cells = [f"{row['results'][loss]['recovered']:.2f}" if loss in row["results"] else "–" for loss in losses]
        lines.append(
            f"| {row['sparsity']:.0%} | {row['allocation']} | {row['pruned']:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", default="0.7,0.8")
    parser.add_argument("--allocations", default=",".join(ALLOCATIONS))
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--max_steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--distill_weight", type=float, default=0.5)
    parser.add_argument("--distill_temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--out", default="outputs/recovery_table")
    parser.add_argument("extra", nargs="*", help="more prune_lora.py flags after --, for every recovery run")
    args = parser.parse_args()
    for name, allowed in (("allocations", ALLOCATIONS), ("losses", LOSSES)):
        values = getattr(args, name).split(",")
        if any(v not in allowed for v in values):
            parser.error(f"--{name} takes a comma-separated subset of {', '.join(allowed)}")
        setattr(args, name, values)
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    if args.max_steps is None:
        import yaml

        args.max_steps = yaml.safe_load(LORA_RECIPE.read_text())["max_steps"]
    return args


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for sparsity in args.sparsities:
        for allocation in args.allocations:
            prune_dir = prune(out, allocation, sparsity)
            pruned = json.loads((prune_dir / "report.json").read_text())["perplexity"]["pruned"]["value"]
            row = {"sparsity": sparsity, "allocation": allocation, "pruned": pruned, "results": {}}
            for loss in args.losses:
                name = f"{allocation}-{sparsity:g}-{loss}-{args.max_steps}"
                row["results"][loss] = recover(out, prune_dir, name, loss, args)
            rows.append(row)
            print(markdown([row], args.losses).splitlines()[-1], flush=True)
    atomic_write_json(out / "table.json", {"max_steps": args.max_steps, "losses": args.losses, "rows": rows})
    (out / "table.md").write_text(markdown(rows, args.losses))
    print(markdown(rows, args.losses))


if __name__ == "__main__":
    main()
