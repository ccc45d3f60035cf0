"""Memory of mask-exact LoRA training: fp32 vs 16-bit (bf16) base vs 4-bit NF4 base (QLoRA), in one run.

    python benchmarks/qlora_memory.py --prune_dir outputs/smollm2-135m/dlp_wanda_70_lora/prune

Each variant trains a step (forward + backward + AdamW on the adapters, batch 2×512 as in the SmolLM2 recipe)
in its own fresh process, so each figure is its own: the bytes of the model's tensors (weights, 4-bit states,
adapters: the footprint QLoRA shrinks), the resident set size once the model is loaded and wrapped, and the
peak resident set size over the whole process; on a GPU also ``torch.cuda.max_memory_allocated``. The
variants run one after the other in this one invocation. Results: ``benchmarks/results/qlora_memory.json``.

The base is prepared as the pipeline prepares it (``dlp.quantize.prepare_4bit_for_training``). It runs where
training runs: on a GPU the default variants are the 16-bit pair (``lora_bf16``, ``qlora_nf4_bf16``) with
activation checkpointing off and on (``--checkpointing off,on``), and the summary gives the QLoRA/LoRA ratio of
CUDA peaks for each; on a CPU all four variants, checkpointing off, as docs/results.md's table was measured. Clocks
are read after a synchronisation.

    python benchmarks/qlora_memory.py --prune_dir P --batch 4 --seqlen 2048      # on a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dlp.rundir import atomic_write_json  # noqa: E402
from dlp.resources import peak_rss_mib, synchronize  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "qlora_memory.json"
VARIANTS = {  # name -> (base dtype = compute dtype, load_in_4bit)
    "lora_fp32": ("float32", False),
    "qlora_nf4_fp32": ("float32", True),
    "lora_bf16": ("bfloat16", False),  # "16-bit LoRA"
    "qlora_nf4_bf16": ("bfloat16", True),  # QLoRA as usually run: NF4 weights, bf16 compute
}


def resident_mib() -> float:
    """The process's resident set size now (not its peak), after handing freed heap pages back to the OS
    (glibc keeps them otherwise, e.g. the fp32 state dict a 4-bit load quantized and dropped)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def tensor_mib(model) -> float:
    """Bytes held by the model's parameters and buffers, 4-bit quantization states included: its footprint."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            parts = [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
            total += sum(t.numel() * t.element_size() for t in parts)
    return total / 2**20


def memory_line(name: str, row: dict) -> str:
    """One variant's figures, as the memory benchmarks print them."""
    return (
        f"{name} model tensors {row['model_tensors_mib']:5.0f} MiB | resident after load "
        f"{row['resident_after_load_mib']:5.0f} MiB | peak while training {row['peak_rss_mib']:5.0f} MiB "
        f"(+{row['peak_over_loaded_mib']:.0f} over the loaded model) | step {min(row['step_s']):.1f} s"
        + (f"  CUDA peak {row['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in row else "")
    )


def timed_steps(model, windows: torch.Tensor, batch: int, steps: int, device: torch.device, loss_of) -> list[float]:
    """``steps`` training steps of ``batch`` windows each (AdamW on the trainable parameters; ``loss_of(ids)`` is
    a step's loss), after resetting the CUDA peak; the seconds of each step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    seconds = []
    for step in range(steps):
        synchronize(device)
        start = time.perf_counter()
        loss_of(windows[step * batch : (step + 1) * batch].to(device)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def worker(variant: str, args) -> dict:
    from trl import ModelConfig

    from dlp.data import load_training_windows
    from dlp.lora import masked_lora_model
    from dlp.masks import MaskSet
    from dlp.modeling import load_model_and_tokenizer
    from dlp.quantize import bnb_config, enable_activation_checkpointing, prepare_4bit_for_training

    name, checkpointing = variant.rsplit(":", 1) if ":" in variant else (variant, "off")
    dtype, four_bit = VARIANTS[name]
    model_args = ModelConfig(
        dtype=dtype, load_in_4bit=four_bit, use_bnb_nested_quant=True, lora_r=16, lora_alpha=32, lora_dropout=0.0
    )
    before_model = peak_rss_mib()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(
        str(Path(args.prune_dir) / "model"), dtype, "sdpa", bnb_config(model_args)
    )
    model = model.to(device) if not four_bit else model
    if four_bit:
        prepare_4bit_for_training(model, checkpointing == "on")
    elif checkpointing == "on":
        enable_activation_checkpointing(model)
    peft_model = masked_lora_model(model, MaskSet.load(Path(args.prune_dir) / "masks.safetensors"), model_args)
    loaded = {
        "model_tensors_mib": tensor_mib(peft_model),
        "resident_after_load_mib": resident_mib(),
        "peak_after_load_mib": peak_rss_mib(),
    }
    windows = load_training_windows(
        tokenizer, "builtin:wikitext2-valid", args.seqlen, max_windows=args.batch * args.steps
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16" and device.type == "cuda")

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        with autocast:
            return peft_model(input_ids=ids, labels=ids).loss

    seconds = timed_steps(peft_model, windows, args.batch, args.steps, device, loss_of)
    result = {
        "variant": variant,
        "activation_checkpointing": checkpointing == "on",
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_model_mib": before_model,
        **loaded,
        "step_s": seconds,
    }
    result["training_growth_mib"] = result["peak_rss_mib"] - before_model
    result["peak_over_loaded_mib"] = result["peak_rss_mib"] - loaded["resident_after_load_mib"]
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def cuda_ratios(results: list[dict]) -> dict[str, float]:
    """QLoRA (NF4, bf16 compute) over 16-bit LoRA CUDA peak, per checkpointing setting measured for both."""
    peaks = {row["variant"]: row["cuda_peak_mib"] for row in results if "cuda_peak_mib" in row}
    ratios = {}
    for setting in ("off", "on"):
        lora, qlora = peaks.get(f"lora_bf16:{setting}"), peaks.get(f"qlora_nf4_bf16:{setting}")
        if lora and qlora:
            ratios[f"checkpointing_{setting}"] = qlora / lora
    return ratios


def main() -> None:
    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prune_dir", default="outputs/smollm2-135m/dlp_wanda_70_lora/prune")
    parser.add_argument("--steps", type=int, default=1, help="Peak memory is reached in the first step.")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--variants", default="lora_bf16,qlora_nf4_bf16" if on_gpu else ",".join(VARIANTS))
    parser.add_argument("--checkpointing", default="off,on" if on_gpu else "off", help="activation checkpointing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    if not (Path(args.prune_dir) / "masks.safetensors").is_file():
        sys.exit(f"error: prune_dir: no masks.safetensors in {args.prune_dir} (run train/prune.py first)")
    names, settings = args.variants.split(","), args.checkpointing.split(",")
    if any(n not in VARIANTS for n in names) or any(c not in ("off", "on") for c in settings):
        sys.exit(f"error: --variants takes {', '.join(VARIANTS)}; --checkpointing takes off, on")
    results = []
    for variant in [f"{name}:{setting}" for setting in settings for name in names]:
        command = [sys.executable, __file__, "--worker", variant, "--prune_dir", args.prune_dir]
        command += ["--steps", str(args.steps), "--batch", str(args.batch), "--seqlen", str(args.seqlen)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(memory_line(f"{variant:18s}", results[-1]), flush=True)
    summary = {
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "prune_dir": args.prune_dir,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "steps": args.steps,
        "results": results,
        "cuda_peak_qlora_over_lora": cuda_ratios(results),
    }
    if summary["cuda_peak_qlora_over_lora"]:
        print("CUDA peak, QLoRA NF4 / 16-bit LoRA: " + json.dumps(summary["cuda_peak_qlora_over_lora"]))
    if not args.no_save:
        atomic_write_json(RESULTS, summary)


if __name__ == "__main__":
    main()
