"""Masks as a first-class artifact.

A :class:`MaskSet` maps full Linear names to boolean keep-masks and carries the metadata that made them
(recipe, per-layer sparsities, seed, calibration-data hash, model id). On disk it is one safetensors file with
bit-packed masks (1 bit per weight) and JSON metadata; it is written to a temporary file and renamed, so a
half-written mask file never looks complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import DlpError, require
from .io import atomic_file
from .modeling import prunable_linears
from .weights import dense_weight, full_shape, gathered

FORMAT = "dlp-masks/1"


@dataclass
class MaskSet:
    masks: dict[str, torch.Tensor]  # full Linear name -> bool [out, in], True = keep
    metadata: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        """SHA-256 over names, shapes and bits: equal digests mean identical masks."""
        h = hashlib.sha256()
        for name in sorted(self.masks):
            mask = self.masks[name]
            h.update(f"{name}:{tuple(mask.shape)};".encode())
            h.update(np.packbits(mask.cpu().numpy().astype(np.uint8)).tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tensors = {name: torch.from_numpy(np.packbits(m.cpu().numpy().astype(np.uint8))) for name, m in self.masks.items()}
        meta = {"format": FORMAT, "shapes": json.dumps({n: list(m.shape) for n, m in self.masks.items()}),
                "metadata": json.dumps(self.metadata), "digest": self.digest()}
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "MaskSet":
        path = Path(path)
        require(path.is_file(), f"masks: file not found: {path}")
        try:
            handle_cm = safe_open(str(path), framework="pt")
        except Exception as exc:  # not safetensors at all: a text file, a truncated copy
            raise DlpError(f"masks: {path} is not a dlp mask file ({type(exc).__name__}: {str(exc)[:80]})")
        with handle_cm as handle:
            meta = handle.metadata() or {}
            require(meta.get("format") == FORMAT, f"masks: {path} is not a dlp mask file (format {meta.get('format')!r})")
            shapes = json.loads(meta["shapes"])
            masks = {}
            for name, shape in shapes.items():
                bits = np.unpackbits(handle.get_tensor(name).numpy())[: int(np.prod(shape))]
                masks[name] = torch.from_numpy(bits.astype(bool).reshape(shape))
        mask_set = cls(masks, json.loads(meta["metadata"]))
        require(mask_set.digest() == meta.get("digest"), f"masks: {path} is corrupt (digest mismatch)")
        return mask_set

    def check_matches(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The model's Linears for these masks; a clear error if names or shapes differ."""
        linears = prunable_linears(model)
        missing = sorted(set(self.masks) - set(linears))
        require(not missing, f"masks: the model has no modules {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                             f"were the masks made for {self.metadata.get('model', 'another model')}?")
        for name, mask in self.masks.items():
            shape = full_shape(linears[name].weight)
            require(tuple(mask.shape) == shape, f"masks: {name} has shape {shape} in the model but {tuple(mask.shape)} in the masks")
        return {name: linears[name] for name in self.masks}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every masked weight of ``model`` (in place)."""
        for name, linear in self.check_matches(model).items():
            linear.weight.mul_(self.masks[name].to(linear.weight.device, linear.weight.dtype))

    @torch.no_grad()
    def violations(self, model: nn.Module) -> int:
        """How many masked-out weights of ``model`` are not exactly zero (0 means the model obeys the masks).

        A 4-bit weight is checked dequantized; ZeRO-3 shards are gathered one Linear at a time (a collective)."""
        count = 0
        for name, linear in self.check_matches(model).items():
            with gathered([linear.weight]):
                weight = dense_weight(linear.weight)
                count += int((weight[~self.masks[name].to(weight.device)] != 0).sum())
        return count

    def sparsity_report(self) -> dict[str, Any]:
        """Per-module and overall sparsity of the masks (fraction of weights removed)."""
        modules = {name: 1.0 - float(mask.float().mean()) for name, mask in self.masks.items()}
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return {"overall": 1.0 - kept / total, "weights": total, "modules": modules}
