"""Time per training step: mask-exact LoRA vs plain peft LoRA, same model, masks, batch and rank, in one run.

    python benchmarks/lora_step.py                      # SmolLM2-135M, 70% masks, batch 4×512, r=16
    python benchmarks/lora_step.py --activation-checkpointing
    python benchmarks/lora_step.py --precision float32,bf16   # also bf16 autocast against float32

It runs where training runs: ``--device auto`` is the GPU when there is one. ``--precision`` lists the compute
precisions to time: ``float32``, or ``bf16`` (float32 weights and adapters under bf16 autocast, as training
with ``bf16: true`` does). The default is bf16 on a GPU or on a CPU with bf16 matrix units (AMX), as dlp's
training default is, and float32 elsewhere.

Steps of all variants are interleaved (plain, masked, plain, ...; the order flips every round) so machine noise
hits them alike; the figures are ratios of median step times. A step is forward + backward + AdamW update of
the adapters; on a GPU the clock is read after a synchronisation. Results go to
``benchmarks/results/lora_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dlp.lora import attach_masks  # noqa: E402
from dlp.masks import MaskSet  # noqa: E402
from dlp.modeling import DEMO_MODEL, load_model_and_tokenizer, prunable_linears  # noqa: E402
from dlp.criteria import keep_mask, magnitude_scores, parse_pattern  # noqa: E402
from dlp.process import cpu_has_bf16_matrix_units, resolve_device, setup  # noqa: E402
from dlp.resources import synchronize  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lora_step.json"


def magnitude_masks(model, sparsity: float) -> MaskSet:
    unstructured = parse_pattern("unstructured")
    return MaskSet(
        {
            name: keep_mask(magnitude_scores(linear.weight), sparsity, unstructured)
            for name, linear in prunable_linears(model).items()
        }
    )


def lora_model(model_id: str, masks: MaskSet | None, args, device: torch.device):
    from peft import LoraConfig, get_peft_model

    model, _ = load_model_and_tokenizer(model_id)
    model.config.use_cache = False
    if masks is not None:
        masks.apply(model)
    targets = sorted({name.rsplit(".", 1)[-1] for name in prunable_linears(model)})
    torch.manual_seed(0)
    peft_model = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=args.dropout, target_modules=targets)
    )
    if args.activation_checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model.enable_input_require_grads()
    return peft_model.to(device)


def step_fn(model, optimizer: torch.optim.Optimizer, ids: torch.Tensor, precision: str):
    """One timed training step at ``precision``."""
    model.train()
    device = ids.device

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    return step


def default_precision(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" or cpu_has_bf16_matrix_units() else "float32"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--precision", default=None, help="float32, bf16, or both comma-separated (default: above)")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.precision and any(p not in ("float32", "bf16") for p in args.precision.split(",")):
        parser.error(f"--precision takes float32, bf16 or both comma-separated (got {args.precision!r})")
    return args


def time_variants(steps: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Run every variant once per round, in an order that flips every round; the first two rounds warm up."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for index in range(rounds + 2):
        for name in names if index % 2 == 0 else reversed(names):
            elapsed = steps[name]()
            if index >= 2:
                times[name].append(elapsed)
    return times


def main() -> None:
    args = parse_args()
    setup(0)
    device = resolve_device(args.device)
    precisions = args.precision.split(",") if args.precision else [default_precision(device)]

    base, _ = load_model_and_tokenizer(args.model)
    masks = magnitude_masks(base, args.sparsity)
    del base
    plain, masked = lora_model(args.model, masks, args, device), lora_model(args.model, masks, args, device)
    attach_masks(masked, masks)
    ids = torch.randint(
        0, plain.config.vocab_size, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(0)
    ).to(device)
    models = {"plain": plain, "masked": masked}
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for name, model in models.items()
    }
    steps = {
        f"{name} {precision}": step_fn(model, optimizers[name], ids, precision)
        for precision in precisions
        for name, model in models.items()
    }
    times = time_variants(steps, args.steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {p: medians[f"masked {p}"] / medians[f"plain {p}"] for p in precisions}
    result = {
        "model": args.model,
        "sparsity": args.sparsity,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "rank": args.rank,
        "dropout": args.dropout,
        "activation_checkpointing": args.activation_checkpointing,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "precisions": precisions,
        "steps": args.steps,
        "median_step_s": medians,
        "ratio_masked_over_plain": ratios,
        "all_step_s": times,
    }
    if len(precisions) == 2:
        result["speedup_bf16_over_float32"] = {
            name: medians[f"{name} float32"] / medians[f"{name} bf16"] for name in ("plain", "masked")
        }
    for p in precisions:
        print(
            f"{p}: plain LoRA {medians[f'plain {p}']:.3f} s/step | mask-exact LoRA {medians[f'masked {p}']:.3f} "
            f"s/step | ratio {ratios[p]:.3f}× (batch {args.batch}×{args.seqlen}, r={args.rank}, "
            f"checkpointing {args.activation_checkpointing}, {result['device']})"
        )
    if "speedup_bf16_over_float32" in result:
        speedup = result["speedup_bf16_over_float32"]
        print(f"bf16 autocast vs float32: plain {speedup['plain']:.2f}× faster, mask-exact {speedup['masked']:.2f}×")
    if not args.no_save:
        save(result, args, precisions, device)


def save(result: dict[str, Any], args, precisions: list[str], device: torch.device) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    key = f"r{args.rank}_b{args.batch}x{args.seqlen}_ckpt{int(args.activation_checkpointing)}_drop{args.dropout}"
    key += f"_{device.type}_{'+'.join(precisions)}"
    previous[key] = result
    RESULTS.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
