"""The recovery stage's teacher, as a recipe asks for it: which model, online or cached, and what the report says.

:mod:`dlp.distill` holds the distillation itself (the loss, the online and cached teachers, the cache's format);
this module wires it to a run: it loads the teacher the way the run loads its student (whole on every process,
never ZeRO-3-partitioned, 4-bit in a QLoRA run), builds the cache before training in cached mode, and gives the
trainer a ``teacher_for(sequences)`` factory (:func:`dlp.finetune.train`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .distill import CACHE_DIR, CachedTeacher, OnlineTeacher, build_teacher_cache, cache_complete, cache_key
from .distributed import zero3_init_disabled
from .rundir import read_json
from .modeling import load_model_and_tokenizer
from .process import resolve_device
from .quantize import bnb_config, keep_canonical_4bit_layout


def load_teacher(model_args, teacher_id: str):
    """The teacher model, whole on this process (never ZeRO-3-partitioned: it only runs forward passes), in the
    run's dtype, or 4-bit like the student's base in a QLoRA run."""
    with zero3_init_disabled():
        teacher, _ = load_model_and_tokenizer(
            teacher_id, model_args.dtype or "float32", model_args.attn_implementation or "sdpa", bnb_config(model_args)
        )
    keep_canonical_4bit_layout(teacher)
    return teacher


def recovery_teacher(model_args, calib_args, distill_args, out: Path, state):
    """``(teacher_for(sequences), weight, temperature)`` for :func:`dlp.finetune.train`, or None without a teacher.

    ``teacher_for`` gets the training sequences as trl prepared them (windows, examples, or the sequences packed
    into rows). Cached mode first makes sure ``out/teacher/`` holds the teacher's top-k for every one of them (a
    resumable stage on the main process; the others wait), so training loads no teacher at all."""
    if not distill_args.enabled:
        return None
    teacher_id = distill_args.teacher_id(model_args.model_name_or_path)
    weight, temperature = distill_args.distill_weight, distill_args.distill_temperature
    if distill_args.teacher_mode == "online":
        return (
            (lambda _sequences: OnlineTeacher(load_teacher(model_args, teacher_id), temperature)),
            weight,
            temperature,
        )
    cache_dir = out / CACHE_DIR

    def cached(sequences):
        if state.is_main_process:
            key = cache_key(sequences, teacher_id, distill_args.distill_top_k, temperature)
            if not cache_complete(cache_dir, key):
                build_teacher_cache(
                    load_teacher(model_args, teacher_id),
                    sequences,
                    cache_dir,
                    key=key,
                    top_k=distill_args.distill_top_k,
                    temperature=temperature,
                    device=resolve_device(calib_args.device),
                )
        state.wait_for_everyone()
        return CachedTeacher(cache_dir, sequences)

    return cached, weight, temperature


def teacher_summary(model_args, distill_args, out: Path) -> dict[str, Any] | None:
    """What the report says of the teacher: who, how (mode, loss mix) and, cached, what the cache holds."""
    if not distill_args.enabled:
        return None
    summary = {
        "teacher": distill_args.teacher_id(model_args.model_name_or_path),
        "mode": distill_args.teacher_mode,
        "weight": distill_args.distill_weight,
        "temperature": distill_args.distill_temperature,
        "loss": "(1 - weight) * LM + weight * temperature^2 * KL(teacher || student)",
    }
    if distill_args.teacher_mode == "cached":
        manifest = read_json(out / CACHE_DIR / "manifest.json") or {}
        summary["cache"] = {key: manifest.get(key) for key in ("sequences", "positions", "top_k", "shards")}
    return summary
