"""What a run cost: wall time per stage and peak memory, as every report records them.

Users size machines from these figures (and a GPU run's fixed overhead only shows up when every stage is timed),
so each stage times its parts under the same names: ``load_s``, ``eval_dense_s``, ``score_s``, ``allocate_s``,
``prune_s`` or ``slice_s``, ``save_s``, ``eval_pruned_s``, then in the pipeline ``train_s``, ``merge_s``,
``export_s`` and ``eval_finetuned_s``. Peak memory is the process's: the host's resident set and, on CUDA, the
most memory PyTorch's tensors held on the device since the process started (a resumed run reports its own).
"""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from typing import Iterator

import torch

MIB = 2**20


def saved_bytes(model: torch.nn.Module) -> int:
    """About the bytes ``model.save_pretrained`` writes: every parameter and buffer once (tied weights once), a
    4-bit weight at its packed size. Checked against the free disk space before an export is written."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the ``with`` body as ``timings[name + "_s"]`` (added to an earlier part's)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[f"{name}_s"] = timings.get(f"{name}_s", 0.0) + time.perf_counter() - start


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op off CUDA): clocks read after it time the work, not its launch,
    and non-blocking copies into host buffers are complete after it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mib() -> float:
    """This process's peak resident set so far, in MiB (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(device: torch.device | str | None = None) -> dict[str, float | None]:
    """``{"host_mib": peak resident set, "device_mib": peak CUDA memory or None}`` of this process so far."""
    device = torch.device(device) if device is not None else None
    host = peak_rss_mib()
    on_device = None
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        on_device = torch.cuda.max_memory_allocated(device) / MIB
    return {"host_mib": round(host, 1), "device_mib": None if on_device is None else round(on_device, 1)}


def resources_line(timings: dict[str, float], memory: dict[str, float | None] | None) -> str:
    """One Markdown line for a summary: every timed part, then the peaks."""
    parts = " · ".join(f"{name[:-2].replace('_', ' ')} {seconds:.1f} s" for name, seconds in timings.items())
    line = f"- wall time: {parts}"
    if memory:
        line += f"; peak memory: host {memory['host_mib'] / 1024:.2f} GiB"
        if memory.get("device_mib") is not None:
            line += f", device {memory['device_mib'] / 1024:.2f} GiB"
    return line
