"""The chat-recovery table of docs/results.md from finished ``train/prune_lora.py`` runs (their report.json).

    python benchmarks/chat_table.py W S T [--json benchmarks/results/chat_recovery_29.json]

Each run's report gives its recovery data, tokens trained, WikiText-2 perplexity and chat scores; the first run's
also gives the rows of the dense and the pruned model (every run scores them on the same references). Runs made
for the table share one prune stage (``--prune_dir``), so the pruned row is the same in each: checked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(name: str, tokens, ppl: float, scores: dict) -> dict:
    return {
        "recovery": name,
        "tokens": tokens,
        "wikitext_ppl": round(ppl, 2),
        "answer_ppl": round(scores["answer_ppl"], 2),
        "greedy_match": round(scores["greedy_match"], 3),
    }


def table(runs: list[Path]) -> list[dict]:
    reports = [json.loads((run / "report.json").read_text()) for run in runs]
    first = reports[0]
    scored = [{k: v for k, v in r["chat"]["scores"]["pruned"].items() if k != "seconds"} for r in reports]
    pruned = {json.dumps(entry, sort_keys=True) for entry in scored}
    assert len(pruned) == 1, "the runs were not recovered from one prune stage and one set of references"
    rows = [row("none (pruned)", None, first["perplexity"]["pruned"]["value"], first["chat"]["scores"]["pruned"])]
    for report in reports:
        teacher = report.get("distillation")
        name = report["config"]["train_data"] + (f" + {teacher['mode']} teacher" if teacher else "")
        chat = report["chat"]["scores"]["finetuned"]
        rows.append(row(name, report["training"]["tokens_seen"], report["perplexity"]["finetuned"]["value"], chat))
    rows.append(row("dense (reference)", None, first["perplexity"]["dense"]["value"], first["chat"]["scores"]["dense"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished train/prune_lora.py output directories")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = table(args.runs)
    print("| recovery data | tokens trained | WikiText-2 ppl | held-out answer ppl | greedy match |")
    print("|---|---|---|---|---|")
    for r in rows:
        tokens = f"{r['tokens']:,}" if r["tokens"] else "—"
        print(f"| {r['recovery']} | {tokens} | {r['wikitext_ppl']} | {r['answer_ppl']} | {r['greedy_match']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
