"""The fine-tuning stage: a LoRA-wrapped compressed model (:mod:`dlp.lora` assembles it) trained with trl's
``SFTTrainer``.

The data is plain language-modelling text cut into consecutive windows of ``max_length`` tokens (so every token
is seen once per epoch and no padding is needed). Checkpoints go to ``<output_dir>/finetune/checkpoint-N``; a
rerun resumes from the newest one (model, optimizer, scheduler, RNG and data position), so an interrupted run
finishes with the same adapter it would have had.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import FinetuneArguments
from .data import load_training_windows
from .errors import DlpError
from .trainer import recovery_trainer


def training_windows(tokenizer, ft_args: FinetuneArguments, seqlen: int):
    """The fine-tuning windows ``[n, seqlen]`` (consecutive, from the start of the text)."""
    return load_training_windows(
        tokenizer, ft_args.train_data, seqlen, ft_args.train_split, ft_args.train_max_windows or None
    )


@dataclass
class TrainResult:
    log_history: list[dict[str, Any]]
    train_seconds: float
    global_steps: int
    tokens_seen: int
    resumed_from: str | None


def last_checkpoint(directory: Path) -> str | None:
    """The newest *complete* ``checkpoint-N`` in ``directory``: the trainer writes ``trainer_state.json`` last,
    so a checkpoint cut short by a kill lacks it (or holds it half-written) and is skipped."""
    candidates = (
        sorted(
            (int(p.name.split("-")[1]), p)
            for p in directory.glob("checkpoint-*")
            if p.is_dir() and p.name.split("-")[1].isdigit()
        )
        if directory.is_dir()
        else []
    )
    for _, path in reversed(candidates):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            print(f"[dlp] skipping incomplete checkpoint {path}")
            continue
        return str(path)
    return None


def train(
    peft_model: nn.Module, tokenizer, ft_args: FinetuneArguments, sft_args, distillation=None
) -> tuple[Any, TrainResult]:
    """Train with ``SFTTrainer`` (:mod:`dlp.trainer`); ``sft_args.output_dir`` holds the checkpoints and is
    resumed from.

    ``distillation``: ``(teacher_for(windows), weight, temperature)`` to train with the distillation loss
    (:mod:`dlp.distill`); the teacher is built from the training windows (a cached one indexes them)."""
    from datasets import Dataset
    from trl import SFTTrainer

    if tokenizer.pad_token is None:  # windows are all full, but the collator insists on a pad id
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    windows = training_windows(tokenizer, ft_args, sft_args.max_length)
    dataset = Dataset.from_dict({"input_ids": windows.tolist()})
    extra = {}
    if distillation is not None:
        teacher_for, weight, temperature = distillation
        extra = {"teacher": teacher_for(windows), "weight": weight, "temperature": temperature}
    trainer_class = recovery_trainer(SFTTrainer)
    resume = last_checkpoint(Path(sft_args.output_dir))
    if resume:
        print(f"[dlp] resuming fine-tuning from {resume}")
    trainer = trainer_class(model=peft_model, args=sft_args, train_dataset=dataset, processing_class=tokenizer, **extra)
    start = time.perf_counter()
    if resume and _finished_training(resume):
        metrics = _restore_finished(trainer, resume)
    else:
        try:
            metrics = trainer.train(resume_from_checkpoint=resume).metrics
        except ValueError as exc:  # e.g. a checkpoint from another recipe
            raise DlpError(f"finetune: {str(exc).splitlines()[0]}")
    seconds = time.perf_counter() - start
    state = trainer.state
    tokens = (
        state.global_step
        * sft_args.max_length
        * sft_args.per_device_train_batch_size
        * sft_args.gradient_accumulation_steps
        * trainer.accelerator.num_processes
    )
    return trainer, TrainResult(
        list(state.log_history), metrics.get("train_runtime", seconds), state.global_step, tokens, resume
    )


def _finished_training(checkpoint: str) -> bool:
    """Whether ``checkpoint`` was saved after the run's last step (a kill between it and the adapter's save).

    The trainer resumed from such a checkpoint trains one step past ``max_steps`` (transformers 5.x), which would
    change the adapter an uninterrupted run writes; so the caller restores it instead of training."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


def _restore_finished(trainer, checkpoint: str) -> dict[str, Any]:
    """Load the final checkpoint's weights and trainer state into ``trainer`` without training a step; the
    adapter then saved holds the same tensors as the uninterrupted run's."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    print(f"[dlp] {checkpoint} is the last step's checkpoint: nothing left to train")
    return {"train_runtime": 0.0}
