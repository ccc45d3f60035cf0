"""The trust probe of issue 26 (items 1-14) against two checkouts, side by side, as a Markdown table.

    git worktree add /tmp/before 1b2c27a
    python benchmarks/trust_table.py --before /tmp/before > table.md        # all items: about 6 min on 2 CPU cores
    python benchmarks/trust_table.py --before /tmp/before --cases 1,4,9     # a subset ("1" runs 1a and 1b)

Each item is a scenario with setup steps (a finished run to rerun into, a second run while the first holds the
directory, a forged file, a full disk, ...), so each is one function below that takes a checkout and a fresh temporary
directory, runs that checkout's own ``train/*.py`` scripts as subprocesses and returns its cell and whether the
promise of issue 26 was kept. The setups mirror the regression tests of the "after" behaviour (tests/test_trust2.py,
tests/test_trust_files.py, tests/test_data_bounded.py) and use the tiny models of tests/conftest.py.

Every script runs as ``sys.executable <checkout>/train/<script>.py`` with cwd the checkout and PYTHONPATH the
checkout, so the checkout's own ``dlp`` is imported (the scripts also put their checkout first on sys.path; the
editable install's finder comes after both). This is checked once per checkout before any case runs.

A cell shows the exit code, ``traceback`` if one was printed, the number of stderr lines when more than one
(progress bars not counted) and the last stderr line (of a run that exited 0: its last stdout line, what it
reported), or what the item measures (steps and bytes, a seed, seconds and GB), and ✅/❌ for the promise. Inputs
several items share (the tiny Llama, a finished 70% prune run, a finished 10-step pipeline run) are made once per
checkout by that checkout's own scripts, and copied where an item changes them. Peak memory is the child's own
``ru_maxrss`` (reaped with ``os.wait4``). Progress goes to stderr; the table to stdout, ending with
``kept: before N/M, after N/M``.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # this checkout's test helpers (the cases run each checkout's own)

from conftest import _text_file, save_tiny_model, tiny_config, tiny_tokenizer  # noqa: E402
from test_prune_lora import write_recipe  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()  # the harness's own model saves

DEMO_RECIPE = Path("recipes") / "smollm2-135m" / "dlp_wanda_70.yaml"  # relative to a checkout
LOCK_FILE, MARKER = ".dlp.lock", ".dlp"
PROGRESS_BAR = re.compile(r"\d+%\||\|\s*\d+/\d+ \[|\d+(\.\d+)?(it/s|s/it)\]")
GB = 1 << 30

Cell = tuple[str, bool | None]  # the cell's text; whether the promise was kept (None: the item was skipped)


class HarnessError(RuntimeError):
    """A setup step failed (not the behaviour under test)."""


@dataclass
class Run:
    """One finished child process."""

    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_gb: float  # the child's own peak resident memory
    stopped: str = ""  # why the harness killed it, if it did

    @property
    def lines(self) -> list[str]:
        """Non-empty stderr lines, progress bars left out."""
        return [line for line in self.stderr.splitlines() if line.strip() and not PROGRESS_BAR.search(line)]

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr

    @property
    def one_error_line(self) -> bool:
        """The promise of every refusal: exit 2, one stderr line, no traceback."""
        return self.code == 2 and len(self.lines) == 1 and not self.traceback

    @property
    def last_line(self) -> str:
        return self.lines[-1] if self.lines else ""


class Checkout:
    """One checkout under test: runs its scripts, and makes the inputs several items share (once, on first use)."""

    def __init__(self, name: str, path: Path, root: Path) -> None:
        self.name, self.path, self.root = name, path.resolve(), root
        root.mkdir(parents=True)

    # --- running its scripts -----------------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(self.path),
            "DLP_CACHE": str(self.root / "dlp-cache"),
            **extra,
        }

    def command(self, script: str, *args: str | Path) -> list[str]:
        return [sys.executable, str(self.path / "train" / f"{script}.py"), *map(str, args)]

    def start(self, script: str, *args: str | Path) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(script, *args),
            cwd=self.path,
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def run(
        self,
        script: str,
        *args: str | Path,
        env: dict[str, str] | None = None,
        timeout: float = 900,
        memory_cap_gb: float | None = None,
    ) -> Run:
        """Run a script to its end (or kill it past ``timeout`` seconds or ``memory_cap_gb`` resident)."""
        return run_process(self.command(script, *args), self.path, env or self.env(), timeout, memory_cap_gb)

    def run_ok(self, script: str, *args: str | Path) -> Run:
        """A setup run, which must succeed."""
        result = self.run(script, *args)
        if result.code != 0:
            raise HarnessError(f"setup run {script} {' '.join(map(str, args))} failed: {result.stderr[-1500:]}")
        return result

    def check_own_dlp(self) -> None:
        """The scripts must import this checkout's dlp, not the editable install's."""
        found = subprocess.run(
            [sys.executable, "-c", "import dlp; print(dlp.__file__)"],
            cwd=self.root,
            env=self.env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not Path(found).resolve().is_relative_to(self.path):
            raise HarnessError(f"{self.name}: PYTHONPATH={self.path} imports {found}")

    def shorten(self, text: str) -> str:
        """Paths of the temporary root and the checkout made short, for the table."""
        text = re.sub(re.escape(str(self.root)) + r"/(cases/[^/]+/)?", "…/", text)
        return text.replace(str(self.path) + "/", "")

    def outcome(self, result: Run, out: Path | None = None) -> str:
        """Exit code, traceback, stderr line count, whether ``out`` was created, and the last line."""
        if result.stopped:
            return f"**{result.stopped}**"
        parts = [f"exit {result.code}"]
        parts += ["traceback"] if result.traceback else []
        parts += [f"{len(result.lines)} stderr lines"] if len(result.lines) > 1 else []
        parts += ["**output_dir created**"] if out is not None and out.exists() else []
        shown = result.stdout if result.code == 0 or not result.lines else ""  # what a finished run reported
        last = next(iter(shown.strip().splitlines()[-1:]), "") or result.last_line
        last = self.shorten(last.strip())
        last = (last if len(last) <= 80 else last[:79] + "…").replace("`", "'")
        return ", ".join(parts) + (f": `{last}`" if last else "")

    # --- inputs several items share ----------------------------------------------------------------------------------
    @functools.cached_property
    def model_dir(self) -> Path:
        return save_tiny_model(self.root / "inputs" / "tiny-llama", "llama")

    @functools.cached_property
    def tiny_args(self) -> list[str]:
        """tests/conftest.py's ``tiny_args`` without --config: the tiny Llama, small local texts, no dense eval."""
        texts = self.root / "inputs"
        return [
            *("--model_name_or_path", str(self.model_dir)),
            *("--calibration_data", _text_file(texts, "calib.txt", 0)),
            *("--eval_data", _text_file(texts, "eval.txt", 1)),
            *("--nsamples", "4", "--seqlen", "64", "--eval_seqlen", "64", "--eval_max_windows", "3"),
            *("--device", "cpu", "--eval_dense", "false"),
        ]

    @property
    def prune_args(self) -> list[str]:
        """tests/conftest.py's ``tiny_args``: the demo recipe (this checkout's) on the tiny Llama (add --output_dir)."""
        return ["--config", str(self.path / DEMO_RECIPE), *self.tiny_args]

    @functools.cached_property
    def prune70(self) -> Path:
        """A finished prune run at the demo recipe's 70%."""
        out = self.root / "shared" / "prune70"
        self.run_ok("prune", *self.prune_args, "--output_dir", out)
        return out

    @functools.cached_property
    def pipeline_recipe(self) -> Path:
        (self.root / "shared").mkdir(exist_ok=True)
        return pipeline_recipe(self.root / "shared" / "pipeline.yaml", self.model_dir)

    @functools.cached_property
    def pipeline(self) -> Path:
        """One uninterrupted 10-step pipeline run (checkpoints at 5 and 10), the reference items 1b, 3, 4, 9 use."""
        out = self.root / "shared" / "pipeline"
        self.run_ok("prune_lora", "--config", self.pipeline_recipe, "--output_dir", out, "--eval_dense", "false")
        return out


def run_process(command: list[str], cwd: Path, env: dict[str, str], timeout: float, memory_cap_gb: float | None) -> Run:
    """Run ``command``, reaping it with ``os.wait4`` for its own peak memory; kill it past a time or memory cap."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err)
        stopped = ""
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - start
            if not stopped and elapsed > timeout:
                stopped = f"killed after {timeout:.0f} s"
            if not stopped and memory_cap_gb and resident_gb(proc.pid) > memory_cap_gb:
                stopped = f"killed at {memory_cap_gb:.1f} GB resident after {elapsed:.0f} s"
            if stopped:
                proc.kill()
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return Run(proc.returncode, out.read(), err.read(), seconds, usage.ru_maxrss * 1024 / GB, stopped)


def resident_gb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) * 1024 / GB if found else 0.0


def pipeline_recipe(path: Path, model_dir: Path) -> Path:
    """tests/test_trust2.py's recipe: 10 steps, checkpoints at 5 and 10, a constant learning rate (so one step more
    changes the adapter) and no ``seed`` key (item 9)."""
    write_recipe(path, model_dir, max_steps=10, save_steps=5, lr_scheduler_type="constant")
    path.write_text("".join(line for line in path.read_text().splitlines(True) if not line.startswith("seed:")))
    return path


def header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header JSON and the length of its header."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), length


def rewrite_mask_metadata(path: Path, **changes: object) -> None:
    """Edit the metadata JSON in a mask file's header as a user with an editor would (tests/test_trust_files.py):
    re-padded, its length rewritten, the tensor bytes as they were, so the file stays valid."""
    data = path.read_bytes()
    head, length = header(path)
    stored = head["__metadata__"]
    stored["metadata"] = json.dumps({**json.loads(stored["metadata"]), **changes}, sort_keys=True)
    encoded = json.dumps(head).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])


@functools.cache
def big_text(root: Path) -> Path:
    """A ~30 MB text: the builtin WikiText-2 validation text again and again, each copy under its own heading with
    a few words changed, so no two copies are the same."""
    source = gzip.decompress((REPO / "dlp" / "builtin_data" / "wikitext2.valid.tokens.gz").read_bytes()).decode()
    lines, rng = source.splitlines(), random.Random(0)
    path = root / "big.txt"
    with path.open("w", encoding="utf-8") as handle:
        copy = 0
        while handle.tell() < 30_000_000:
            varied = [f" = Part {copy} = "]
            for line in lines:
                words = line.split(" ")
                if len(words) > 4 and rng.random() < 0.2:
                    words[rng.randrange(len(words))] = rng.choice(["river", "castle", "album", "station", "game"])
                varied.append(" ".join(words))
            handle.write("\n".join(varied) + "\n")
            copy += 1
    return path


# --- the items ----------------------------------------------------------------------------------------------------
def case_1a(ck: Checkout, tmp: Path) -> Cell:
    """A finished 70% prune run, rerun into with --sparsity 0.5: refused in one line naming sparsity."""
    out = tmp / "run"
    shutil.copytree(ck.prune70, out)
    result = ck.run("prune", *ck.prune_args, "--output_dir", out, "--sparsity", "0.5")
    overall = json.loads((out / "report.json").read_text())["sparsity"]["overall"]
    text = ck.outcome(result) + (f"; report.json: {overall:.0%}" if result.code == 0 else "")
    return text, result.one_error_line and "sparsity" in result.last_line


def case_1b(ck: Checkout, tmp: Path) -> Cell:
    """A finished pipeline run, rerun into with another --learning_rate: refused in one line naming it."""
    out = tmp / "run"
    shutil.copytree(ck.pipeline, out)
    args = ("--config", ck.pipeline_recipe, "--output_dir", out, "--eval_dense", "false", "--learning_rate", "0.005")
    result = ck.run("prune_lora", *args)
    return ck.outcome(result), result.one_error_line and "learning_rate" in result.last_line


def case_2(ck: Checkout, tmp: Path) -> Cell:
    """Run A frozen (SIGSTOP) once it holds its directory; run B into it with --sparsity 0.5: B exits 2 naming A."""
    out = tmp / "run"
    args = [*ck.prune_args, "--output_dir", str(out)]
    first = ck.start("prune", *args)
    try:
        deadline, held = time.time() + 300, ""
        while not held and time.time() < deadline and first.poll() is None:
            lock = out / LOCK_FILE
            if lock.is_file() and lock.read_text().strip() == str(first.pid):
                held = "its lock"
            elif (out / "masks.safetensors").is_file() or (out / MARKER).is_file():
                held = "its first files (no lock)"
            else:
                time.sleep(0.005)
        if not held:
            raise HarnessError(f"run A never took {out} (exit {first.poll()})")
        first.send_signal(signal.SIGSTOP)
        second = ck.run("prune", *args, "--sparsity", "0.5")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    kept = second.one_error_line and f"pid {first.pid}" in second.last_line
    return f"A frozen holding {held}; B: {ck.outcome(second)}", kept


def case_3(ck: Checkout, tmp: Path) -> Cell:
    """merge.py: the base and masks of a 90% prune run, the adapter of the 70% pipeline run: refused in one line."""
    other = tmp / "p90"
    ck.run_ok("prune", *ck.prune_args, "--output_dir", other, "--sparsity", "0.9")
    out = tmp / "merged"
    result = ck.run(
        "merge",
        *("--base_dir", other / "model", "--adapter_dir", ck.pipeline / "adapter"),
        *("--output_dir", out, "--probe_data", ""),
    )
    return ck.outcome(result, out), result.one_error_line and not out.exists()


def case_4(ck: Checkout, tmp: Path) -> Cell:
    """The 10-step pipeline, everything after its last checkpoint deleted, rerun: 10 steps, the same adapter."""
    out = tmp / "run"
    args = ("--config", ck.pipeline_recipe, "--output_dir", out, "--eval_dense", "false")
    ck.run_ok("prune_lora", *args)
    for name in ("adapter", "model", "merge.json", "eval.json", "report.json", "summary.md"):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    result = ck.run("prune_lora", *args)
    if result.code != 0:
        return ck.outcome(result), False
    steps = json.loads((out / "report.json").read_text())["training"]["global_steps"]
    same = {
        name: (out / name / file).read_bytes() == (ck.pipeline / name / file).read_bytes()
        for name, file in (("adapter", "adapter_model.safetensors"), ("model", "model.safetensors"))
    }
    text = f"exit 0, {steps} steps; " + ", ".join(
        f"{name} {'=' if equal else '≠'} uninterrupted run's" for name, equal in same.items()
    )
    return text, steps == 10 and same["adapter"]


def case_5(ck: Checkout, tmp: Path) -> Cell:
    """The pipeline with both --prune_dir and --slice_dir: refused in one line, nothing written."""
    out = tmp / "o"
    result = ck.run(
        "prune_lora",
        *("--config", ck.pipeline_recipe, "--output_dir", out, "--eval_dense", "false"),
        *("--prune_dir", tmp / "a", "--slice_dir", tmp / "b"),
    )
    return ck.outcome(result, out), result.one_error_line and not out.exists()


def _load_in_4bit(script: str, ck: Checkout, tmp: Path) -> Cell:
    out = tmp / "o"
    result = ck.run(script, "--model_name_or_path", ck.model_dir, "--output_dir", out, "--load_in_4bit", "true")
    return ck.outcome(result, out), result.one_error_line and not out.exists()


def case_6a(ck: Checkout, tmp: Path) -> Cell:
    """train/prune.py --load_in_4bit true: refused in one line."""
    return _load_in_4bit("prune", ck, tmp)


def case_6b(ck: Checkout, tmp: Path) -> Cell:
    """train/slice.py --load_in_4bit true: refused in one line."""
    return _load_in_4bit("slice", ck, tmp)


def case_7(ck: Checkout, tmp: Path) -> Cell:
    """A tied-embedding Llama with --lora_target_modules q_proj lm_head: refused in one line before the prune stage."""
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    model_dir = tmp / "tied"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp / "o"
    result = ck.run(
        "prune_lora",
        *("--config", pipeline_recipe(tmp / "recipe.yaml", model_dir), "--output_dir", out),
        *("--eval_dense", "false", "--lora_target_modules", "q_proj", "lm_head"),
    )
    text = ck.outcome(result) + (", **prune stage ran**" if (out / "prune").exists() else "")
    return text, result.one_error_line and not (out / "prune").exists()


def case_8(ck: Checkout, tmp: Path) -> Cell:
    """A recipe giving a key twice: refused in one line naming both lines."""
    recipe = tmp / "twice.yaml"
    recipe.write_text("sparsity: 0.7\nallocation: dlp\nsparsity: 0.5\n")
    result = ck.run("prune", "--config", recipe, *ck.tiny_args, "--output_dir", tmp / "o")
    return ck.outcome(result), result.one_error_line and "lines 1 and 3" in result.last_line


def case_9(ck: Checkout, tmp: Path) -> Cell:
    """A pipeline recipe without ``seed``: its prune stage seeds like train/prune.py (0)."""
    head, _ = header(ck.pipeline / "prune" / "masks.safetensors")
    seed = json.loads(head["__metadata__"]["metadata"])["seed"]
    return f"prune stage's masks: seed {seed} (train/prune.py: 0)", seed == 0


def case_10(ck: Checkout, tmp: Path) -> Cell:
    """A prune run onto a 96 KiB tmpfs: exit 2, no traceback, a last line naming the directory and the bytes."""
    disk = tmp / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        return f"skipped: cannot mount a tmpfs ({mounted.stderr.decode().strip()[:60]})", None
    try:
        out = disk / "run"
        result = ck.run("prune", *ck.prune_args, "--output_dir", out)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    last = result.last_line
    kept = (
        result.code == 2
        and not result.traceback
        and str(out) in last
        and re.search(r"\d+ ?(bytes|[KMG]i?B)", last) is not None
    )
    return ck.outcome(result), kept


def case_11(ck: Checkout, tmp: Path) -> Cell:
    """prune.py on a model whose model.safetensors was cut to a third: one line, nothing written."""
    model_dir = save_tiny_model(tmp / "model")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    out = tmp / "run"
    result = ck.run("prune", *ck.prune_args, "--output_dir", out, "--model_name_or_path", model_dir)
    return ck.outcome(result, out), result.one_error_line and not out.exists()


def case_12(ck: Checkout, tmp: Path) -> Cell:
    """A GGUF model with DLP_CACHE beneath a regular file: one line naming DLP_CACHE. The GGUF is
    tests/test_trust_files.py's ``fake_gguf`` (a header, no tensors): the cache must be checked before it is read."""
    gguf = tmp / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 7)
    (tmp / "afile").write_text("a file, not a directory")
    out = tmp / "run"
    result = ck.run(
        "prune",
        *ck.prune_args,
        *("--output_dir", out, "--model_name_or_path", gguf),
        env=ck.env(DLP_CACHE=str(tmp / "afile" / "sub")),
    )
    return ck.outcome(result, out), result.one_error_line and "DLP_CACHE" in result.last_line


def case_13(ck: Checkout, tmp: Path) -> Cell:
    """masks.safetensors with its layer_sparsities edited by hand: ``masks.py verify`` refuses it or says so."""
    masks = tmp / "masks.safetensors"
    shutil.copyfile(ck.prune70 / "masks.safetensors", masks)
    head, _ = header(masks)
    recorded = json.loads(head["__metadata__"]["metadata"])["layer_sparsities"]
    rewrite_mask_metadata(masks, layer_sparsities=[0.5] * len(recorded))
    result = ck.run("masks", "verify", "--masks", masks, "--model", ck.prune70 / "model")
    said = "edited" in (result.stdout + result.stderr).lower()
    return ck.outcome(result), result.code == 2 or said


def case_14(ck: Checkout, tmp: Path) -> Cell:
    """A ~30 MB calibration text with --nsamples 2 --seqlen 32: under 1.5 GB peak and 60 s (killed past 4 GB). The
    same run on the small calibration text is shown beside it: what the model, libraries and run take anyway."""
    small = ck.run_ok("prune", *ck.prune_args, "--output_dir", tmp / "small", "--nsamples", "2", "--seqlen", "32")
    result = ck.run(
        "prune",
        *ck.prune_args,
        *("--output_dir", tmp / "run", "--calibration_data", big_text(ck.root.parent)),
        *("--nsamples", "2", "--seqlen", "32"),
        timeout=600,
        memory_cap_gb=4,
    )
    beside = f" (small text: {small.seconds:.0f} s, {small.peak_gb:.2f} GB)"
    if result.stopped or result.code:
        return ck.outcome(result) + beside, False
    text = f"exit 0, {result.seconds:.0f} s, {result.peak_gb:.2f} GB peak" + beside
    return text, result.peak_gb < 1.5 and result.seconds < 60


CASES: dict[str, tuple[str, Callable[[Checkout, Path], Cell]]] = {
    "1a": ("finished prune run (70%), rerun with --sparsity 0.5", case_1a),
    "1b": ("finished pipeline run, rerun with --learning_rate 0.005", case_1b),
    "2": ("second prune run into a directory a frozen run holds", case_2),
    "3": ("merge: 90% base and masks, adapter of a 70% run", case_3),
    "4": ("pipeline rerun after its last checkpoint (10 steps)", case_4),
    "5": ("pipeline with --prune_dir and --slice_dir", case_5),
    "6a": ("prune.py --load_in_4bit true", case_6a),
    "6b": ("slice.py --load_in_4bit true", case_6b),
    "7": ("tied embeddings, --lora_target_modules q_proj lm_head", case_7),
    "8": ("recipe gives sparsity twice", case_8),
    "9": ("pipeline recipe without seed: prune stage's seed", case_9),
    "10": ("prune run onto a 96 KiB tmpfs", case_10),
    "11": ("model.safetensors cut to a third", case_11),
    "12": ("GGUF model, DLP_CACHE beneath a regular file", case_12),
    "13": ("masks.py verify, layer_sparsities edited by hand", case_13),
    "14": ("30 MB calibration text, --nsamples 2 --seqlen 32", case_14),
}


def selected(spec: str | None) -> list[str]:
    """Case ids for ``--cases``: an item number selects all its rows ("1": 1a and 1b), an id just that row."""
    if not spec:
        return list(CASES)
    wanted = {part.strip() for part in spec.split(",") if part.strip()}
    unknown = wanted - set(CASES) - {re.sub(r"[a-z]$", "", case) for case in CASES}
    if unknown:
        raise SystemExit(f"error: --cases: no case {', '.join(sorted(unknown))} (cases: {', '.join(CASES)})")
    return [case for case in CASES if case in wanted or re.sub(r"[a-z]$", "", case) in wanted]


def run_case(case: str, ck: Checkout) -> Cell:
    tmp = ck.root / "cases" / case
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        text, kept = CASES[case][1](ck, tmp)
    except Exception as exc:  # noqa: BLE001 - a harness failure becomes the cell, and the other cases still run
        traceback.print_exc()
        text, kept = f"**harness error**: {ck.shorten(str(exc)).splitlines()[0][:80]}", False
    mark = "" if kept is None else (" ✅" if kept else " ❌")
    print(f"[{case} {ck.name}] {time.perf_counter() - start:.0f} s{mark} {text}", file=sys.stderr, flush=True)
    return text.replace("|", "\\|") + mark, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a checkout (e.g. a git worktree) of the older commit")
    parser.add_argument("--after", default=str(REPO), help="the checkout to compare it with (default: this one)")
    parser.add_argument("--cases", help="comma-separated item numbers or case ids (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (its path goes to stderr)")
    args = parser.parse_args()
    cases = selected(args.cases)
    root = Path(tempfile.mkdtemp(prefix="trust-table-"))
    print(f"working in {root}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        checkouts = [
            Checkout("before", Path(args.before), root / "before"),
            Checkout("after", Path(args.after), root / "after"),
        ]
        for ck in checkouts:
            ck.check_own_dlp()
        rows = {case: [run_case(case, ck) for ck in checkouts] for case in cases}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("| case | before | after |\n|---|---|---|")
    for case, cells in rows.items():
        print(f"| {case}. {CASES[case][0]} | {cells[0][0]} | {cells[1][0]} |")
    counts = [
        f"{name} {sum(c[i][1] is True for c in rows.values())}/{sum(c[i][1] is not None for c in rows.values())}"
        for i, name in enumerate(("before", "after"))
    ]
    print(f"\nkept: {', '.join(counts)}")
    print(f"{len(rows)} cases in {(time.perf_counter() - start) / 60:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
