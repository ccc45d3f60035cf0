"""The recovery stage's trainer: on a CPU its loss from the logits is trl's fused-head loss, value and gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from dlp.trainer import recovery_trainer


def _trainer(tmp_path, model, trainer_class):
    from datasets import Dataset
    from trl import SFTConfig

    windows = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_length=12,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    dataset = Dataset.from_dict({"input_ids": windows.tolist()})
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.unk_token  # as dlp.finetune.train sets it: windows are all full
    return recovery_trainer(trainer_class)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def _loss_and_grads(compute_loss, model, batch, items):
    model.zero_grad(set_to_none=True)
    loss = compute_loss(model, dict(batch), num_items_in_batch=items)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cpu_loss_from_the_logits_is_trls_fused_head_loss(tmp_path):
    from trl import SFTTrainer

    model = tiny_model("llama").train()
    trainer = _trainer(tmp_path, model, SFTTrainer)
    assert trainer.accelerator.device.type == "cpu"
    batch = next(iter(trainer.get_train_dataloader()))
    batch["labels"][0, :3] = -100  # a few unpredicted positions, as a prompt mask would leave
    items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()) + 5)  # as if the batch were accumulated
    ours = _loss_and_grads(trainer.compute_loss, model, batch, items)
    theirs = _loss_and_grads(lambda *a, **k: SFTTrainer.compute_loss(trainer, *a, **k), model, batch, items)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
    assert ours[1].keys() == theirs[1].keys() and ours[1]
    for name, grad in theirs[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=1e-4, atol=1e-6)
