"""Process-wide settings every entry point applies: device choice, seeds, and CPU denormal flushing.

Pruned models push many activations toward zero; on x86 CPUs arithmetic on denormal (subnormal) floats is
microcoded and can slow matmuls several times over, so dlp flushes denormals to zero on CPU
(``torch.set_flush_denormal``). ``benchmarks/denormals.py`` measures the effect.
"""

from __future__ import annotations

import os
import random

import torch

from .errors import DlpError, require


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DlpError(f"device must be auto, cpu, cuda or cuda:N (got {name!r})")
    require(device.type != "cuda" or torch.cuda.is_available(), f"device {name!r} requested but CUDA is not available")
    return device


def setup(seed: int) -> None:
    seed_all(seed)
    torch.set_flush_denormal(True)


def seed_all(seed: int) -> None:
    """Seed Python's and torch's generators (torch's seeds every device too).

    Needed wherever a run draws random numbers, not once per process: a fresh process's torch generator starts
    from a random seed (torch 2.13 here), and a run that reuses a finished stage skips that stage's seeding."""
    random.seed(seed)
    torch.manual_seed(seed)


def use_cpu_without_accelerator() -> list[tuple[str, str, str]]:
    """On a machine without GPUs, set up CPU processes properly *before* any training arguments are built.

    Returns defaults for the training arguments, as ``parse_config`` takes them (empty when nothing is needed):
    ``bf16`` unless the recipe or command line sets it (:func:`cpu_bf16_default`), and the DeepSpeed backend below.

    ``accelerate launch`` with a DDP config starts N processes, but without ``ACCELERATE_USE_CPU`` each process
    sees no GPU and decides it runs alone, so N copies of the whole job run side by side. With it they form one
    gloo process group. The training arguments set up the process state as they are parsed, hence "before".
    Under DeepSpeed that flag would make accelerate drop DeepSpeed for plain DDP; DeepSpeed runs its CPU engine
    instead, but accelerate only counts the processes when it is told the backend, so dlp asks for
    ``--ddp_backend gloo`` (without it every process believes it is alone and the batch sizes disagree).
    ``accelerate launch`` also sets ``OMP_NUM_THREADS=1`` in every process, which halves a 2-core machine's
    speed even with one process; dlp gives each process its share of the cores instead.
    """
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if has_accelerator:
        return []
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    extra_args = [cpu_bf16_default(deepspeed)]
    if deepspeed:
        extra_args.append(("--ddp_backend", "gloo", ""))
    else:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        extra_args.append(("--use_cpu", "true", ""))  # transformers refuses bf16 on a CPU unless told use_cpu
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if launched_by_accelerate and os.environ.get("OMP_NUM_THREADS") == "1":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if threads > 1:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
            print(f"[dlp] accelerate launch set OMP_NUM_THREADS=1; using {threads} threads per process on CPU")
    return extra_args


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX tiles)."""
    supported = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(supported and supported())


def cpu_bf16_default(deepspeed: bool) -> tuple[str, str, str]:
    """The ``bf16`` default on a machine without GPUs (trl's own default, bf16 on, fails there).

    With AMX, bf16 autocast trains SmolLM2-135M's LoRA stage about 1.4× faster than float32 (``benchmarks/
    lora_step.py``); the weights, the merge and every evaluation stay float32. Without AMX, bf16 is emulated and
    slower, so float32. DeepSpeed's CPU engine is left in float32: its bf16 path is a GPU one."""
    if cpu_has_bf16_matrix_units() and not deepspeed:
        note = "CPU with bf16 matrix units (AMX): bf16 autocast, float32 weights (bf16: true; set bf16 to choose)"
        return ("--bf16", "true", note)
    return ("--bf16", "false", "no GPU here: training in float32 (bf16: false; set bf16 to choose)")
