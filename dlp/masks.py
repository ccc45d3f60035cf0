"""Masks as a first-class artifact.

A :class:`MaskSet` maps full Linear names to boolean keep-masks and carries the metadata that made them
(recipe, per-layer sparsities, seed, calibration-data hash, model id). On disk it is one safetensors file with
bit-packed masks (1 bit per weight) and JSON metadata; it is written to a temporary file and renamed, so a
half-written mask file never looks complete.

One bit layout serves the file, the digest and the masks mask-exact LoRA keeps on the device
(:func:`pack_bits`): the mask flattened row by row, 8 weights per byte, most significant bit first, the last byte
zero-padded (``numpy.packbits``' layout, which the files have always used).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from .errors import DlpError, require
from .rundir import atomic_write_bytes
from .modeling import find_decoder_layers, prunable_linears
from .projections import gathered, logical_shape, logical_weight
from .report import layer_sparsity_from_modules
from .tensorfile import header_bytes

FORMAT = "dlp-masks/1"
# Recorded (allocated) and measured per-layer sparsities differ only by each module's rounding to whole weights
# (criteria prune round(rows·cols·s) weights: at most half a weight per module, 0.001 on a 16x32 module); a larger
# gap means the recorded values are not the ones these bits were pruned to.
LAYER_SPARSITY_TOLERANCE = 0.005
_LAYER_INDEX = re.compile(r"^(.+?)\.(\d+)\.")  # "model.layers.3.mlp.up_proj" -> ("model.layers", "3")
_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool mask of any shape → uint8 [ceil(numel / 8)] on the mask's device (the layout: see the module docstring).

    On the CPU numpy's packbits computes it (two orders of magnitude faster than the shift-and-sum below, which
    serves masks on an accelerator); tests hold the two to the same bytes."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.numpy().astype(np.uint8, copy=False)))
    return _pack_bits_torch(mask)


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: the bool mask of ``shape``, on the bits' device."""
    if bits.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(bits.numpy(), count=math.prod(shape)).view(bool).reshape(shape))
    return _unpack_bits_torch(bits, shape)


def _pack_bits_torch(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).view(-1, 8)
    return (padded << _BIT_SHIFTS.to(mask.device)).sum(-1, dtype=torch.uint8)


def _unpack_bits_torch(bits: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    unpacked = (bits.unsqueeze(-1) >> _BIT_SHIFTS.to(bits.device)) & 1
    return unpacked.view(-1)[: math.prod(shape)].view(*shape).bool()


@dataclass
class MaskSet:
    masks: dict[str, torch.Tensor]  # full Linear name -> bool [out, in], True = keep
    metadata: dict[str, Any] = field(default_factory=dict)
    force: bool = False  # accept a model whose fingerprint differs from the one the masks were made for
    # whether the metadata read from a file is the metadata written: "ok" (its checksum matches), "unchecked" (a file
    # from before checksums), "mismatch" (edited, loaded with force), "" (not loaded from a file)
    metadata_check: str = field(default="", compare=False)

    def _identity_problems(self, model: nn.Module, linears: dict[str, nn.Module]) -> list[str]:
        """How ``model`` differs in kind from the model these masks were made for (their recorded fingerprint)."""
        if not self.metadata.get("fingerprint"):
            return []
        seen = model_fingerprint(model, linears)
        return [
            f"they were made for {label} {made!r}, the model has {found!r}"
            for label, made, found in fingerprint_mismatches(
                self.metadata["fingerprint"], seen["model_type"], seen["num_layers"]
            )
        ]

    def _raise_or_warn(self, problems: list[str]) -> None:
        for problem in problems:
            if not self.force:
                made_for = self.metadata.get("model", "another model")
                raise DlpError(f"masks: {problem}; were the masks made for {made_for}? (--force applies them anyway)")
            warnings.warn(f"masks: {problem}; applying them anyway because of --force", stacklevel=4)

    def digest(self) -> str:
        """SHA-256 over names, shapes and bits: equal digests mean identical masks."""
        h = hashlib.sha256()
        for name in sorted(self.masks):
            mask = self.masks[name]
            h.update(f"{name}:{tuple(mask.shape)};".encode())
            h.update(pack_bits(mask.cpu()).numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write the masks; equal masks and metadata give byte-identical files (see :func:`safetensors_bytes`)."""
        path = Path(path)
        packed = {name: pack_bits(m.cpu()).numpy().tobytes() for name, m in self.masks.items()}
        metadata = json.dumps(self.metadata, sort_keys=True)
        meta = {
            "format": FORMAT,
            "shapes": json.dumps({n: list(m.shape) for n, m in sorted(self.masks.items())}),
            "metadata": metadata,
            "metadata_sha256": _sha256(metadata),  # the digest covers the bits only; this, what people read
            "digest": self.digest(),
        }
        atomic_write_bytes(path, safetensors_bytes(packed, meta))  # refused before writing if the disk is too small
        return path

    @classmethod
    def load(cls, path: str | Path, force: bool = False) -> "MaskSet":
        """Read a mask file; a one-line DlpError if it is not one, if its bits do not match their digest, or if its
        metadata was edited after it was written (with ``force``: a warning, and ``metadata_check`` says so)."""
        path = Path(path)
        require(path.is_file(), f"masks: file not found: {path}")
        try:
            handle_cm = safe_open(str(path), framework="pt")
        except Exception as exc:  # not safetensors at all: a text file, a truncated copy
            raise DlpError(f"masks: {path} is not a dlp mask file ({type(exc).__name__}: {str(exc)[:80]})")
        with handle_cm as handle:
            meta = handle.metadata() or {}
            require(
                meta.get("format") == FORMAT, f"masks: {path} is not a dlp mask file (format {meta.get('format')!r})"
            )
            shapes = json.loads(meta["shapes"])
            masks = {}
            for name, shape in shapes.items():
                masks[name] = unpack_bits(handle.get_tensor(name), tuple(shape))
        mask_set = cls(masks, json.loads(meta["metadata"]), force=force)
        require(mask_set.digest() == meta.get("digest"), f"masks: {path} is corrupt (digest mismatch)")
        mask_set.metadata_check = _check_metadata(path, meta, force)
        return mask_set

    def check_matches(self, model: nn.Module) -> dict[str, nn.Module]:
        """The model's prunable projections (Linear or Conv1D) for these masks; a one-line error unless the model
        is the kind the masks were made for (its fingerprint: architecture, layer count, prunable modules) and
        every prunable module has a mask (shapes compared in the logical [out, in] orientation).

        With ``force`` set, a different architecture or layer count or uncovered modules only warn (loudly);
        modules the masks name must still exist with the masks' shapes."""
        linears = prunable_linears(model)
        self._raise_or_warn(self._identity_problems(model, linears))  # the most telling message first
        missing = sorted(set(self.masks) - set(linears))
        require(
            not missing,
            f"masks: the model has no modules {missing[:3]}{'...' if len(missing) > 3 else ''}; "
            f"were the masks made for {self.metadata.get('model', 'another model')}?",
        )
        for name, mask in self.masks.items():
            shape = logical_shape(linears[name])  # masks are [out, in] also for a Conv1D stored [in, out]
            require(
                tuple(mask.shape) == shape,
                f"masks: {name} has shape {shape} in the model but {tuple(mask.shape)} in the masks",
            )
        uncovered = sorted(set(linears) - set(self.masks))
        if uncovered:
            self._raise_or_warn(
                [
                    f"they cover {len(linears) - len(uncovered)} of the model's {len(linears)} prunable "
                    f"modules ({uncovered[0]} has no mask)"
                ]
            )
        return {name: linears[name] for name in self.masks}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every masked weight of ``model`` (in place)."""
        for name, linear in self.check_matches(model).items():
            weight = logical_weight(linear)  # a Conv1D's transposed view: the product writes through
            weight.mul_(self.masks[name].to(weight.device, weight.dtype))

    @torch.no_grad()
    def violations(self, model: nn.Module) -> int:
        """How many masked-out weights of ``model`` are not exactly zero (0 means the model obeys the masks).

        A 4-bit weight is checked dequantized; ZeRO-3 shards are gathered one Linear at a time (a collective)."""
        count = 0
        for name, linear in self.check_matches(model).items():
            with gathered([linear.weight]):
                weight = logical_weight(linear)
                count += int((weight[~self.masks[name].to(weight.device)] != 0).sum())
        return count

    def measured_layer_sparsities(self) -> list[float] | None:
        """Each decoder layer's sparsity as the bits have it (weighted by module size), or None when the names do
        not number decoder layers under one prefix. What ``report`` and ``verify`` show instead of trusting the
        recorded ``layer_sparsities``."""
        found = {name: _LAYER_INDEX.match(name) for name in self.masks}
        prefixes = {match.group(1) for match in found.values() if match}
        if not self.masks or None in found.values() or len(prefixes) != 1:
            return None
        recorded = (self.metadata.get("fingerprint") or {}).get("num_layers")
        largest = max(int(match.group(2)) for match in found.values()) + 1
        num_layers = recorded if isinstance(recorded, int) and recorded >= largest else largest
        modules = self.sparsity_report()["modules"]
        sizes = {name: mask.numel() for name, mask in self.masks.items()}
        return layer_sparsity_from_modules(modules, sizes, num_layers, prefixes.pop())

    def layer_sparsity_disagreement(self) -> str | None:
        """A sentence saying how the recorded ``layer_sparsities`` differ from the measured ones by more than
        rounding (:data:`LAYER_SPARSITY_TOLERANCE`), or None when they agree or either is unknown."""
        recorded, measured = self.metadata.get("layer_sparsities"), self.measured_layer_sparsities()
        if not isinstance(recorded, list) or measured is None:
            return None
        shown = " ".join(f"{100 * s:.2f}" for s in measured)
        if len(recorded) != len(measured):
            return f"the metadata records {len(recorded)} layer sparsities; the bits have {len(measured)}: {shown}%"
        try:
            gaps = [(abs(float(r) - m), i) for i, (r, m) in enumerate(zip(recorded, measured))]
        except (TypeError, ValueError):
            return f"the recorded layer_sparsities are not numbers; measured from the bits: {shown}%"
        gap, layer = max(gaps)
        if gap <= LAYER_SPARSITY_TOLERANCE:
            return None
        return (
            f"the recorded layer_sparsities disagree with the bits (layer {layer}: recorded "
            f"{100 * float(recorded[layer]):.2f}%, measured {100 * measured[layer]:.2f}%); measured: {shown}%"
        )

    def sparsity_report(self) -> dict[str, Any]:
        """Per-module and overall sparsity of the masks (fraction of weights removed)."""
        modules = {name: 1.0 - float(mask.float().mean()) for name, mask in self.masks.items()}
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return {"overall": 1.0 - kept / total, "weights": total, "modules": modules}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_metadata(path: Path, meta: dict[str, str], force: bool) -> str:
    """``metadata_check`` of a loaded file whose digest matched: the stored metadata JSON against the checksum
    written beside it. A mismatch is a hand edit (the bits are intact), so the model name, recipe and layer
    sparsities the file shows are not the ones it was made with."""
    if "metadata_sha256" not in meta:
        return "unchecked"  # written before dlp recorded the checksum
    if meta["metadata_sha256"] == _sha256(meta["metadata"]):
        return "ok"
    problem = (
        f"masks: {path}: its metadata was edited after it was written (metadata checksum mismatch); the bits are "
        "intact (digest ok), but its model name, recipe and layer sparsities are not the recorded ones"
    )
    if not force:
        raise DlpError(f"{problem} (train/masks.py --force reads it anyway)")
    warnings.warn(f"{problem}; reading it anyway because of --force", stacklevel=3)
    return "mismatch"


def masks_of_model(model_dir: str | Path) -> Path:
    """The mask file of a pruned model directory: inside it (the pipeline's and ``train/merge.py``'s exports) or
    beside it (a ``train/prune.py`` run keeps ``masks.safetensors`` next to ``model/``); the inside path when
    neither exists, for the caller's message."""
    inside = Path(model_dir) / "masks.safetensors"
    beside = Path(model_dir).resolve().parent / "masks.safetensors"
    return beside if not inside.is_file() and beside.is_file() else inside


def safetensors_bytes(tensors: dict[str, bytes], metadata: dict[str, str]) -> bytes:
    """A safetensors file of 1-D uint8 tensors, byte for byte determined by its inputs (:mod:`dlp.tensorfile`'s
    layout: sorted header, data in name order)."""
    entries = [(name, "U8", [len(data)], len(data)) for name, data in tensors.items()]
    return header_bytes(entries, metadata) + b"".join(tensors[name] for name in sorted(tensors))


def model_fingerprint(model: nn.Module, linears: dict[str, nn.Module] | None = None) -> dict[str, Any]:
    """What a mask file is bound to: the architecture (``config.model_type``), the number of decoder layers and
    every prunable module with its logical shape (as one SHA-256). Weights are left out on purpose: the same masks
    apply to the dense, the pruned and the fine-tuned model."""
    linears = prunable_linears(model) if linears is None else linears
    shapes = json.dumps(sorted((name, list(logical_shape(module))) for name, module in linears.items()))
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", type(model).__name__),
        "num_layers": len(find_decoder_layers(model)[1]),
        "modules_sha256": hashlib.sha256(shapes.encode()).hexdigest(),
    }


def fingerprint_mismatches(made: dict[str, Any] | None, model_type: str, num_layers: int) -> list[tuple[str, Any, Any]]:
    """(what, what the masks were made for, what the model has) for each way a model differs in kind from the
    fingerprint a mask file recorded: the one comparison behind both a loaded model's check and the config-only
    check of reused masks (:func:`dlp.preflight.check_masks_fit`)."""
    made = made or {}
    return [
        (label, made[key], seen)
        for key, label, seen in (
            ("model_type", "architecture", model_type),
            ("num_layers", "decoder layers", num_layers),
        )
        if key in made and made[key] != seen
    ]


@torch.no_grad()
def zero_fraction(model: nn.Module) -> float:
    """The share of the model's prunable weights that are exactly zero: its real sparsity, whatever masks say."""
    zeros = total = 0
    for module in prunable_linears(model).values():
        with gathered([module.weight]):
            weight = logical_weight(module)
            zeros, total = zeros + int((weight == 0).sum()), total + weight.numel()
    return zeros / max(total, 1)
