"""Memory of the recovery stage's teachers: no teacher vs an online teacher vs a cached top-k teacher, in one run.

    python benchmarks/distill_memory.py --prune_dir outputs/smollm2-135m/dlp_wanda_70_lora/prune

Each variant trains the same steps (forward + loss + backward + AdamW on the mask-exact adapters, batch 2×512 of
WikiText-2 valid windows as in the SmolLM2 recipe) in its own fresh process, so each figure is its own:

* ``none``: the plain LM loss;
* ``online``: the dense teacher loaded beside the student and run on every batch (``teacher_mode: online``);
* ``cached``: the teacher's top-k log-probabilities read from a cache built once before the variants run
  (``teacher_mode: cached``); the cache's size on disk is reported, and no teacher is ever loaded there.

Reported per variant: the model tensors' bytes, the resident set size once student (and teacher) are loaded,
the peak resident set size over the whole process, and on a GPU ``torch.cuda.max_memory_allocated``. Results:
``benchmarks/results/distill_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qlora_memory import memory_line, resident_mib, tensor_mib, timed_steps  # noqa: E402

from dlp.rundir import atomic_write_json  # noqa: E402
from dlp.resources import peak_rss_mib  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "distill_memory.json"
VARIANTS = ("none", "online", "cached")


def training_windows(tokenizer, args) -> torch.Tensor:
    from dlp.data import load_training_windows

    return load_training_windows(tokenizer, "builtin:wikitext2-valid", args.seqlen, max_windows=args.batch * args.steps)


def load_teacher(args, device: torch.device):
    from dlp.modeling import load_model_and_tokenizer

    teacher, _ = load_model_and_tokenizer(args.teacher, args.dtype, "sdpa")
    return teacher.to(device).eval().requires_grad_(False)


def teacher_for(variant: str, args, windows: torch.Tensor, device: torch.device):
    from dlp.distill import CachedTeacher, OnlineTeacher

    if variant == "online":
        return OnlineTeacher(load_teacher(args, device), args.temperature)
    if variant == "cached":
        return CachedTeacher(Path(args.cache_dir), windows)
    return None


def worker(variant: str, args) -> dict:
    from trl import ModelConfig

    from dlp.distill import distillation_loss
    from dlp.lora import masked_lora_model
    from dlp.masks import MaskSet
    from dlp.modeling import load_model_and_tokenizer

    before_model = peak_rss_mib()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(str(Path(args.prune_dir) / "model"), args.dtype, "sdpa")
    model_args = ModelConfig(dtype=args.dtype, lora_r=16, lora_alpha=32, lora_dropout=0.0)
    student = masked_lora_model(model.to(device), MaskSet.load(Path(args.prune_dir) / "masks.safetensors"), model_args)
    windows = training_windows(tokenizer, args)
    teacher = teacher_for(variant, args, windows, device)
    loaded = {
        "model_tensors_mib": tensor_mib(student) + (tensor_mib(teacher.model) if variant == "online" else 0.0),
        "resident_after_load_mib": resident_mib(),
    }

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        predicted = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=device)
        targets = None if teacher is None else teacher.targets({"input_ids": ids}, predicted)
        logits = student(input_ids=ids, use_cache=False).logits
        weight = 0.0 if teacher is None else args.weight
        return distillation_loss(logits, ids, targets, weight, args.temperature, int(predicted.sum()))[0]

    seconds = timed_steps(student, windows, args.batch, args.steps, device, loss_of)
    result = {"variant": variant, "peak_rss_mib": peak_rss_mib(), "rss_before_model_mib": before_model, **loaded}
    result["peak_over_loaded_mib"] = result["peak_rss_mib"] - loaded["resident_after_load_mib"]
    result["step_s"] = seconds
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def build_cache(args) -> float:
    """The cached variant's top-k cache for the benchmark's windows (built here, outside the measured process);
    returns its size on disk in MiB."""
    from dlp.distill import build_teacher_cache, cache_key
    from dlp.modeling import load_model_and_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, tokenizer = load_model_and_tokenizer(str(Path(args.prune_dir) / "model"), args.dtype, "sdpa")
    windows = training_windows(tokenizer, args)
    key = cache_key(windows, args.teacher, args.top_k, args.temperature)
    teacher = load_teacher(args, device)
    build_teacher_cache(
        teacher, windows, Path(args.cache_dir), key=key, top_k=args.top_k, temperature=args.temperature, device=device
    )
    return sum(p.stat().st_size for p in Path(args.cache_dir).iterdir()) / 2**20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prune_dir", default="outputs/smollm2-135m/dlp_wanda_70_lora/prune")
    parser.add_argument("--teacher", default="smollm2-135m", help="the dense model (the run's teacher: dense)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=2, help="Peak memory is reached in the first step.")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--weight", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true")
    return parser.parse_args()


def run_worker(variant: str, args) -> dict:
    flags = ["--prune_dir", args.prune_dir, "--teacher", args.teacher, "--dtype", args.dtype, "--cache_dir"]
    flags += [args.cache_dir, "--steps", str(args.steps), "--batch", str(args.batch), "--seqlen", str(args.seqlen)]
    flags += ["--top_k", str(args.top_k), "--weight", str(args.weight), "--temperature", str(args.temperature)]
    done = subprocess.run([sys.executable, __file__, "--worker", variant, *flags], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the {variant} variant failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if not (Path(args.prune_dir) / "masks.safetensors").is_file():
        sys.exit(f"error: prune_dir: no masks.safetensors in {args.prune_dir} (run train/prune.py first)")
    variants = args.variants.split(",")
    if any(v not in VARIANTS for v in variants):
        sys.exit(f"error: variants must be among {', '.join(VARIANTS)} (got {args.variants!r})")
    with tempfile.TemporaryDirectory() as cache_dir:
        args.cache_dir = cache_dir
        cache_mib = build_cache(args) if "cached" in variants else None
        results = []
        for variant in variants:
            row = run_worker(variant, args)
            results.append(row)
            print(memory_line(f"{variant:7s}", row), flush=True)
    if cache_mib is not None:
        print(
            f"cache on disk: {cache_mib:.1f} MiB for {args.batch * args.steps} windows of {args.seqlen} "
            f"(top-k {args.top_k})"
        )
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        **{k: getattr(args, k) for k in ("prune_dir", "teacher", "dtype", "batch", "seqlen", "steps", "top_k")},
        "cache_mib": cache_mib,
        "results": results,
    }
    if not args.no_save:
        atomic_write_json(RESULTS, summary)


if __name__ == "__main__":
    main()
