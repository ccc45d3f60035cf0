"""safetensors files whose bytes are determined by their inputs, written as a stream.

``safetensors.save_file`` keeps the metadata in a hash map, so the header's key order (and the file's SHA-256)
changes from process to process, and it builds the whole file in memory. Here the header is JSON with sorted keys
and the tensors follow in name order, in the format's own layout (8-byte little-endian header size, the header
padded with spaces to a multiple of 8, then the data), which ``safe_open`` reads like any other safetensors
file; the data are written one tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .rundir import atomic_file

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_BYTES = {code: dtype.itemsize for dtype, code in DTYPES.items()}  # a safetensors dtype code's element size


def header_bytes(entries: list[tuple[str, str, list[int], int]], metadata: dict[str, str]) -> bytes:
    """The length prefix and header of a file holding ``(name, dtype code, shape, byte size)`` entries, whose data
    follow in name order."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name, dtype, shape, size in sorted(entries):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's data in row-major order, little-endian (the machine's order on every CPU dlp runs on)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def file_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """The bytes :func:`write_tensors` writes for these tensors."""
    return len(header_bytes(_entries(tensors), metadata)) + sum(_nbytes(t) for t in tensors.values())


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` to ``path`` atomically (refused before writing if the disk is too small)."""
    with atomic_file(path, size=file_size(tensors, metadata)) as tmp, open(tmp, "wb") as handle:
        handle.write(header_bytes(_entries(tensors), metadata))
        for name in sorted(tensors):
            handle.write(tensor_bytes(tensors[name]))
    return Path(path)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _entries(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, list[int], int]]:
    return [(name, DTYPES[t.dtype], list(t.shape), _nbytes(t)) for name, t in tensors.items()]
