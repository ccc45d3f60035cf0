"""Every user mistake of tests/test_malformed_inputs.py against two checkouts, side by side, as a Markdown table.

    git worktree add /tmp/old 8939327
    python benchmarks/error_table.py --before /tmp/old > table.md

Each cell shows the exit code, whether a traceback or more than one stderr line appeared, whether output_dir changed,
and the last stderr line. The promise under test: exit 2, one ``error:`` line, output_dir untouched. The cases and
their inputs are the test's own, so the table and the test can never disagree on what was fed in.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's dlp and test helpers

import test_malformed_inputs as cases  # noqa: E402
from conftest import save_tiny_model  # noqa: E402


def run_cases(checkout: Path, root: Path) -> dict:
    """Run every case with ``checkout``'s scripts in one driver process; mark the cases that changed output_dir."""
    (root / "inputs").mkdir(parents=True)
    inputs = cases._inputs(root / "inputs", save_tiny_model(root / "inputs" / "tiny-llama", "llama"))
    todo, watched = [], {}
    for case_id, (script, _, argv, _, kind) in zip(cases.CASE_IDS, cases.CASES):
        case_dir = root / "cases" / case_id
        (case_dir / "cwd").mkdir(parents=True)
        out, paths = cases._make_output(case_dir, kind)
        todo.append(
            {
                "id": case_id,
                "script": str(checkout / Path(script).relative_to(REPO)),
                "argv": [a.format(out=out, **inputs) for a in argv],
                "cwd": str(case_dir / "cwd"),
            }
        )
        watched[case_id] = {path: cases.snapshot(path) for path in paths}
    (root / "cases.json").write_text(json.dumps(todo))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DLP_CACHE": str(root / "cache")}
    subprocess.run(
        [sys.executable, cases.DRIVER, str(root / "cases.json"), str(root / "results.json")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,
        check=True,
    )
    found = json.loads((root / "results.json").read_text())
    for case_id, paths in watched.items():
        found[case_id]["touched"] = any(cases.snapshot(path) != state for path, state in paths.items())
    return found


def kept_promise(result: dict) -> bool:
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    return (
        not result.get("uncaught")
        and result["code"] == 2
        and len(lines) == 1
        and "Traceback" not in result["stderr"]
        and not result["touched"]
    )


def cell(result: dict) -> str:
    if result.get("uncaught"):
        return f"uncaught exception: `{result['uncaught'].strip().splitlines()[-1][:70]}`"
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    parts = [f"exit {result['code']}"]
    parts += ["traceback"] if "Traceback" in result["stderr"] else []
    parts += [f"{len(lines)} stderr lines"] if len(lines) != 1 else []
    parts += ["**output_dir changed**"] if result["touched"] else []
    last = re.sub(r"/\S*/(inputs|cases)/", "…/", lines[-1] if lines else "").replace("|", "\\|")[:90]
    return ", ".join(parts) + (f": `{last}`" if last else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a checkout (e.g. a git worktree) of the older commit")
    parser.add_argument("--after", default=str(REPO), help="the checkout to compare it with (default: this one)")
    args = parser.parse_args()
    before = run_cases(Path(args.before).resolve(), Path(tempfile.mkdtemp(prefix="before-")))
    after = run_cases(Path(args.after).resolve(), Path(tempfile.mkdtemp(prefix="after-")))
    print("| case | before | after |\n|---|---|---|")
    for case_id in cases.CASE_IDS:
        print(f"| {case_id} | {cell(before[case_id])} | {cell(after[case_id])} |")
    broken = [sum(not kept_promise(r[c]) for c in cases.CASE_IDS) for r in (before, after)]
    print(f"\n{len(cases.CASE_IDS)} cases; broke the promise: {broken[0]} before, {broken[1]} after")


if __name__ == "__main__":
    main()
