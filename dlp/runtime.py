"""Process-wide settings every entry point applies: device choice, seeds, and CPU denormal flushing.

Pruned models push many activations toward zero; on x86 CPUs arithmetic on denormal (subnormal) floats is
microcoded and can slow matmuls several times over, so dlp flushes denormals to zero on CPU
(``torch.set_flush_denormal``). ``benchmarks/denormals.py`` measures the effect.
"""

from __future__ import annotations

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
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
