"""Time per training step: mask-exact LoRA vs plain peft LoRA, same model, masks, batch and rank, in one run.

    python benchmarks/lora_step.py                      # SmolLM2-135M, 70% masks, batch 4×512, r=16
    python benchmarks/lora_step.py --activation-checkpointing

Steps of the two variants are interleaved (plain, masked, plain, ...) so machine noise hits both alike; the
figure is the ratio of median step times. A step is forward + backward + AdamW update of the adapters.
Results go to ``benchmarks/results/lora_step.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dlp.lora import attach_masks  # noqa: E402
from dlp.masks import MaskSet  # noqa: E402
from dlp.modeling import DEMO_MODEL, load_model_and_tokenizer, prunable_linears  # noqa: E402
from dlp.criteria import keep_mask, magnitude_scores, parse_pattern  # noqa: E402
from dlp.process import setup  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "lora_step.json"


def magnitude_masks(model, sparsity: float) -> MaskSet:
    unstructured = parse_pattern("unstructured")
    return MaskSet(
        {
            name: keep_mask(magnitude_scores(linear.weight), sparsity, unstructured)
            for name, linear in prunable_linears(model).items()
        }
    )


def lora_model(model_id: str, masks: MaskSet | None, args):
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
    return peft_model


def step_fn(model, ids: torch.Tensor):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO_MODEL)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    setup(0)

    base, _ = load_model_and_tokenizer(args.model)
    masks = magnitude_masks(base, args.sparsity)
    del base
    plain, masked = lora_model(args.model, masks, args), lora_model(args.model, masks, args)
    attach_masks(masked, masks)
    ids = torch.randint(
        0, plain.config.vocab_size, (args.batch, args.seqlen), generator=torch.Generator().manual_seed(0)
    )
    steps = {"plain": step_fn(plain, ids), "masked": step_fn(masked, ids)}
    times: dict[str, list[float]] = {"plain": [], "masked": []}
    for index in range(args.steps + 2):
        for name in ("plain", "masked") if index % 2 == 0 else ("masked", "plain"):
            elapsed = steps[name]()
            if index >= 2:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "model": args.model,
        "sparsity": args.sparsity,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "rank": args.rank,
        "dropout": args.dropout,
        "activation_checkpointing": args.activation_checkpointing,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "median_step_s": medians,
        "ratio_masked_over_plain": medians["masked"] / medians["plain"],
        "all_step_s": times,
    }
    print(
        f"plain LoRA {medians['plain']:.3f} s/step | mask-exact LoRA {medians['masked']:.3f} s/step | "
        f"ratio {result['ratio_masked_over_plain']:.3f}× (batch {args.batch}×{args.seqlen}, r={args.rank}, "
        f"checkpointing {args.activation_checkpointing})"
    )
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        key = f"r{args.rank}_b{args.batch}x{args.seqlen}_ckpt{int(args.activation_checkpointing)}_drop{args.dropout}"
        previous[key] = result
        RESULTS.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
