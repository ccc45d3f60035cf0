"""Where the calibration sweep keeps its hidden states: resident on the compute device, or parked in host memory.

The sweep moves one decoder layer at a time to the device, but every layer reads the hidden states of all
calibration windows and writes as many (64 × 2048 tokens of a 2048-wide model are 512 MiB in bf16). Parked on
the host, every layer forward pays a full copy each way over the bus and a synchronisation per micro-batch; on an
H200 that made the default (sequential) mode 1.9× slower than the research code, which keeps everything on the
device. Resident, nothing crosses the bus. A memory budget decides:

* resident when two hidden-state buffers (the layer's inputs and its outputs), one layer's weights and one
  micro-batch's working set fit in the budget;
* otherwise parked in *pinned* host memory, copied with ``non_blocking`` and synchronised once per layer forward.

The budget (``calibration_memory``) is ``auto`` (80% of the device memory free when the sweep starts, within a
per-process cap set with ``torch.cuda.set_per_process_memory_fraction``), a size in GiB, or ``host``. On a CPU
the device *is* the host: there is nothing to decide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import require

AUTO_FRACTION = 0.8  # of the free device memory: the rest is left to the caching allocator's fragmentation
GIB = 2**30


def check_memory_setting(setting: str) -> None:
    """``calibration_memory`` must be auto, host or a positive size in GiB; one line otherwise."""
    message = f"calibration_memory must be auto, host or a size in GiB > 0 (got {setting!r})"
    if setting in ("auto", "host"):
        return
    try:
        require(float(setting) > 0, message)
    except ValueError:
        require(False, message)


@dataclass(frozen=True)
class Placement:
    """The sweep's decision: where layers compute, where hidden states live, and why."""

    device: torch.device  # where each layer computes
    store: torch.device  # where the hidden states of all windows live between layer forwards
    pinned: bool  # host buffers are page-locked, so copies to and from the device need not block
    budget: int | None  # bytes of device memory the sweep may use (None on a CPU, or with "host")
    needed: int  # bytes residency would take: two hidden buffers, one layer, one micro-batch's working set

    @property
    def resident(self) -> bool:
        return self.store == self.device

    def describe(self) -> str:
        need = f"{self.needed / GIB:.2f} GiB"
        if self.device.type == "cpu":
            return "calibration on the CPU: hidden states in host memory"
        budget = "calibration_memory: host" if self.budget is None else f"a {self.budget / GIB:.2f} GiB budget"
        if self.resident:
            return f"calibration hidden states resident on {self.device} (needs {need} of {budget})"
        return f"calibration hidden states parked in pinned host memory (residency needs {need}; {budget})"


def device_budget(device: torch.device, setting: str) -> int | None:
    """Bytes of ``device`` memory the sweep may use; None for ``host``. ``auto`` counts what is free on the device
    and, under a per-process cap, what the cap still leaves this process."""
    if setting == "host":
        return None
    if setting != "auto":
        return int(float(setting) * GIB)
    free, total = torch.cuda.mem_get_info(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _device: 1.0)(device)
    under_cap = int(fraction * total) - torch.cuda.memory_reserved(device)
    return int(AUTO_FRACTION * max(0, min(free, under_cap)))


def working_bytes(layer: nn.Module, batch_tokens: int, dtype: torch.dtype) -> int:
    """A micro-batch's working set in one layer forward, estimated from the layer's widest projection: its
    activations in the model's dtype (three of them: gate, up and their product in a gated MLP) plus the float32
    copy and square the statistics hooks take of a projection's input."""
    widths = [max(m.weight.shape) for m in layer.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    widest = max(widths, default=1)
    return batch_tokens * widest * (3 * dtype.itemsize + 2 * 4)


def plan_placement(
    device: torch.device, setting: str, shape: tuple[int, ...], dtype: torch.dtype, layer: nn.Module, batch_size: int
) -> Placement:
    """Decide where a sweep keeps hidden states of ``shape`` ([windows, seqlen, width]) and ``dtype``."""
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    hidden_bytes = math.prod(shape) * dtype.itemsize
    batch_tokens = batch_size * math.prod(shape[1:-1])
    needed = 2 * hidden_bytes + layer_bytes + working_bytes(layer, batch_tokens, dtype)
    if device.type != "cuda":
        return Placement(device, device, False, None, needed)
    budget = device_budget(device, setting)
    if budget is not None and needed <= budget:
        return Placement(device, device, False, budget, needed)
    return Placement(device, torch.device("cpu"), True, budget, needed)
