"""The trainer of the recovery stage: trl's ``SFTTrainer`` with dlp's loss, with or without a teacher.

Only ``compute_loss`` changes; the data, collator, optimizer, checkpoints and resumption are trl's own.

* With a teacher (:mod:`dlp.distill`) the loss is ``(1 − w)·LM + w·T²·KL`` from the student's logits, and the
  log gains the two parts (``lm_loss``, ``kd_loss``) beside ``loss``.
* Without one, on a GPU the loss is trl's own: its fused LM head scores tokens in tiles with Triton kernels and
  never holds the ``[batch, length, vocab]`` logits. Elsewhere that head is a chunked PyTorch function that
  runs the LM-head matmul a second time in backward: on SmolLM2-135M on this project's 2-core CPU it made a
  2×512 training step 1.2–1.5 s (about 25%) slower than the plain logits. There the LM loss is computed from the
  logits, with the same token count trl divides by, so the value is trl's loss to float rounding (tested).
"""

from __future__ import annotations

from typing import Any

import torch

from .distill import CachedTeacher, OnlineTeacher, distillation_loss


def recovery_trainer(trainer_class: type) -> type:
    """``trainer_class`` (trl's ``SFTTrainer``) with the recovery stage's loss (see the module docstring)."""

    class RecoveryTrainer(trainer_class):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.teacher: OnlineTeacher | CachedTeacher | None = None
            self.distill_weight, self.distill_temperature = 0.0, 1.0
            self._parts: dict[str, list[float]] = {"lm_loss": [], "kd_loss": []}

        def set_teacher(self, teacher: OnlineTeacher | CachedTeacher, weight: float, temperature: float) -> None:
            """Train with ``teacher`` from now on (set after construction: a cached teacher is built from the
            sequences trl prepared, which exist only once the trainer does)."""
            self.teacher, self.distill_weight, self.distill_temperature = teacher, weight, temperature
            if isinstance(teacher, OnlineTeacher) and not getattr(teacher.model, "is_loaded_in_4bit", False):
                teacher.model.to(self.accelerator.device)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self._count_tokens(inputs)
            if self.teacher is None and self.accelerator.device.type == "cuda":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            model_inputs = {name: value for name, value in inputs.items() if name != "labels"}
            outputs = model(**model_inputs, use_cache=False)
            predicted = labels[:, 1:] != -100
            targets = None if self.teacher is None else self.teacher.targets(model_inputs, predicted)
            count = predicted.sum() if num_items_in_batch is None else num_items_in_batch
            count = torch.as_tensor(count, device=labels.device).clamp(min=1)
            loss, lm, kd = distillation_loss(
                outputs.logits, labels, targets, self.distill_weight, self.distill_temperature, count
            )
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                scale = self.accelerator.num_processes  # as trl's loss: DDP averages the ranks' gradients
                loss, lm, kd = loss * scale, lm * scale, kd * scale
            if self.teacher is not None:
                self._parts["lm_loss"].append(float(lm))
                self._parts["kd_loss"].append(float(kd))
            return (loss, outputs) if return_outputs else loss

        def _count_tokens(self, inputs: dict[str, torch.Tensor]) -> None:
            """Add the micro-batch's real tokens (not padding), over every process, to the state's count, which
            checkpoints keep (transformers' own count takes the pad id for padding, and trl pads with EOS)."""
            mask = inputs.get("attention_mask")
            tokens = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
            tokens = self.accelerator.gather(tokens.reshape(1).to(self.accelerator.device)).sum()
            self.state.num_input_tokens_seen += int(tokens)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs and self._parts["lm_loss"]:
                steps = self.args.gradient_accumulation_steps
                for name, values in self._parts.items():  # per optimizer step, as "loss" is
                    logs[name] = round(sum(values) / len(values) * steps, 6)
                    values.clear()
            super().log(logs, start_time)

    RecoveryTrainer.__name__ = f"Recovery{trainer_class.__name__}"
    return RecoveryTrainer
