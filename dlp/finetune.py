"""The fine-tuning stage: a LoRA-wrapped compressed model (:mod:`dlp.lora` assembles it) trained with trl's
``SFTTrainer``.

The data is either language-modelling text cut into consecutive windows of ``max_length`` tokens (every token seen
once per epoch, no padding), or rows in one of trl's formats that trl itself templates, tokenizes, masks and packs
(:mod:`dlp.sft_data`). Checkpoints go to ``<output_dir>/finetune/checkpoint-N``; a
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

import torch

from .config import FinetuneArguments
from .errors import DlpError, require
from .sft_data import TrainRows, text_windows
from .trainer import recovery_trainer


def training_dataset(tokenizer, data: TrainRows, ft_args: FinetuneArguments, sft_args):
    """What the trainer is given: text as consecutive windows of ``max_length`` tokens (``input_ids``: trl takes
    them as tokenized), rows as they are (trl applies the chat template, tokenizes and masks them)."""
    from datasets import Dataset

    if data.windows:
        windows = text_windows(tokenizer, data, ft_args.train_split, sft_args.max_length, ft_args.train_max_windows)
        return Dataset.from_dict({"input_ids": windows.tolist()})
    return Dataset.from_list(data.rows)


def prepared_sequences(dataset) -> list[torch.Tensor]:
    """The separate sequences of trl's prepared dataset: each row, or each of the sequences packed into a row
    (its ``seq_lengths``); what a cached teacher is computed on."""
    sequences = []
    for row in dataset:
        ids = torch.tensor(row["input_ids"], dtype=torch.long)
        sequences += list(ids.split(list(row["seq_lengths"]))) if "seq_lengths" in row else [ids]
    return sequences


def _check_trainable_rows(dataset, max_length: int) -> None:
    """Every prepared row should hold a token to train on. trl drops rows left without one by truncation, but not
    when it packs (the completion of a prompt longer than ``max_length`` is cut off); a dataset with none at all
    would train nothing while reporting a loss of 0, so it is refused, and a share of them is said."""
    if "labels" not in dataset.column_names:
        return  # text windows: every token is trained on
    empty = sum(all(label == -100 for label in labels) for labels in dataset["labels"])
    require(
        empty < len(dataset),
        f"max_length: at {max_length} tokens no training row keeps a token to train on (the prompts fill it); "
        "raise max_length or shorten the prompts",
    )
    if empty:
        print(f"[dlp] {empty} of {len(dataset)} training rows keep no token to train on at max_length {max_length}")


@dataclass
class TrainResult:
    log_history: list[dict[str, Any]]
    train_seconds: float
    global_steps: int
    tokens_seen: int  # real tokens (no padding) over every process
    resumed_from: str | None
    data_format: str = "text"
    train_rows: int = 0  # rows of the prepared dataset: windows, examples or packed rows
    train_examples: int = 0  # windows, or rows of the data before trl prepared (and packed) them


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
    peft_model: nn.Module, tokenizer, ft_args: FinetuneArguments, sft_args, data: TrainRows, distillation=None
) -> tuple[Any, TrainResult]:
    """Train with ``SFTTrainer`` (:mod:`dlp.trainer`); ``sft_args.output_dir`` holds the checkpoints and is
    resumed from.

    ``data``: the checked training source (:mod:`dlp.sft_data`). ``distillation``: ``(teacher_for(sequences),
    weight, temperature)`` to train with the distillation loss (:mod:`dlp.distill`); the teacher is built from the
    sequences trl prepared (a cached one indexes them), so it sees exactly the student's tokens."""
    from trl import SFTTrainer

    if tokenizer.pad_token is None:  # windows are all full, but the collator insists on a pad id
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    dataset = training_dataset(tokenizer, data, ft_args, sft_args)
    trainer_class = recovery_trainer(SFTTrainer)
    resume = last_checkpoint(Path(sft_args.output_dir))
    if resume:
        print(f"[dlp] resuming fine-tuning from {resume}")
    try:
        trainer = trainer_class(model=peft_model, args=sft_args, train_dataset=dataset, processing_class=tokenizer)
    except (ValueError, RuntimeError) as exc:  # trl's checks of the data against the options, e.g. no assistant turn
        raise DlpError(f"train_data: {str(exc).splitlines()[0]}")
    _check_trainable_rows(trainer.train_dataset, sft_args.max_length)
    if distillation is not None:
        teacher_for, weight, temperature = distillation
        trainer.set_teacher(teacher_for(prepared_sequences(trainer.train_dataset)), weight, temperature)
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
    return trainer, TrainResult(
        list(state.log_history),
        metrics.get("train_runtime", seconds),
        state.global_step,
        state.num_input_tokens_seen,
        resume,
        data.format,
        len(trainer.train_dataset),
        len(dataset),
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
