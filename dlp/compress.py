"""Writing compressed exports: a pruned model as mask bits plus kept values, smaller on disk and in memory, and
faster to decode on a CPU.

Reading them is the job of :mod:`dlp.compressed` (its :mod:`~dlp.compressed.modeling_compressed`, which describes
the format, is shipped inside every compressed export with the kernel, so the model loads without dlp).

Kept values are stored in the model's dtype (``values: model``: the decompressed model is bitwise the dense
export) or quantized (:func:`quantize_values`): int8, int4 or NF4 codes with one float16 step per output row and
group of ``group_size`` columns (0: one per output row). A group's step comes from its kept weights only: the
pruned ones are zero and never raise the maximum.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ExportArguments, SparseValuesArguments
from .export import export_model
from .errors import require
from .masks import MaskSet, pack_bits
from .projections import gathered, is_transposed, logical_weight
from .rundir import atomic_dir
from .tensorfile import DTYPE_BYTES, file_size, write_tensors
from .compressed import modeling_compressed
from .compressed.modeling_compressed import FORMAT, QUANTIZED, WEIGHTS_NAME, DlpCompressedConfig

SHIPPED = (Path(modeling_compressed.__file__), Path(modeling_compressed.__file__).with_name("sparse_kernel.py"))
AUTO_MAP = {
    "AutoConfig": "modeling_compressed.DlpCompressedConfig",
    "AutoModelForCausalLM": "modeling_compressed.DlpCompressedForCausalLM",
}


def quantize_values(weight: torch.Tensor, mask: torch.Tensor, values: str, group_size: int):
    """(kept codes in row order, float16 scales [out, groups], group, codebook or None) of a pruned weight [out, in].

    Blocks of one row by ``group`` columns (the pruned weights are zero there and never raise a block's maximum):
    int8 by bitsandbytes' ``int8_vectorwise_quant`` (round(w · 127 / absmax), step absmax / 127), NF4 by its
    ``quantize_4bit`` (the nearest of 16 NormalFloat levels of w / absmax, step absmax). int4 is the symmetric
    uniform grid round(w · 7 / r) in [-7, 7], as a 16-entry codebook (q / 7) with step r, the block's range r
    chosen for the least squared error (:func:`_int4_steps`): neither bitsandbytes nor torch has a uniform 4-bit
    quantizer. Pruning keeps the large weights, so the kept ones spread over the whole range: NF4's levels, dense
    near 0 for normally distributed weights, fit them worse (results.md)."""
    import bitsandbytes.functional as bnb

    out, inn = weight.shape
    group = group_size or inn + (-inn) % 8
    padded = F.pad(weight.float() * mask, (0, (-inn) % group))
    blocks = padded.reshape(-1, group)
    if values == "int8":
        codes, absmax, _ = bnb.int8_vectorwise_quant(blocks)
        steps, codebook = absmax / 127, None
    elif values == "int4":
        steps = _int4_steps(blocks)
        codes = (_int4_grid(blocks, steps) + 8).to(torch.uint8)
        codebook = [(code - 8) / 7 for code in range(16)]
    else:
        packed, state = bnb.quantize_4bit(
            blocks.reshape(-1), blocksize=group, quant_type="nf4", compress_statistics=False
        )
        packed = packed.reshape(-1)
        codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)  # bitsandbytes: high nibble first
        steps, codebook = state.absmax, [float(v) for v in state.code.float()]
    codes = codes.reshape(out, -1)[:, :inn][mask]
    return codes, steps.reshape(out, -1).half(), group, codebook


INT4_CLIPS = tuple(1 - 0.05 * i for i in range(11))  # the fractions of a block's maximum tried as its int4 range


def _int4_grid(blocks: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """round(w · 7 / step) in [-7, 7] for each block's weights (a zero step: an all-pruned block, codes 0)."""
    return torch.round(blocks / torch.where(steps > 0, steps, torch.ones_like(steps))[:, None] * 7).clamp(-7, 7)


def _int4_steps(blocks: torch.Tensor) -> torch.Tensor:
    """Each block's int4 range: the fraction of its maximum (:data:`INT4_CLIPS`) with the least squared rounding
    error. With 15 levels, clipping the one or two largest weights a little buys finer steps for all others."""
    absmax = blocks.abs().amax(dim=1)
    best, best_error = absmax.clone(), torch.full_like(absmax, float("inf"))
    for clip in INT4_CLIPS:
        step = (absmax * clip).half().float()  # as the file keeps it
        error = (blocks - _int4_grid(blocks, step) * step[:, None] / 7).square().sum(dim=1)
        better = error < best_error
        best, best_error = torch.where(better, step, best), torch.where(better, error, best_error)
    return best


def compress_projection(weight: torch.Tensor, mask: torch.Tensor, values: str, group_size: int):
    """(stored tensors, spec) of one pruned projection: mask bits, kept values (and scales), see the format."""
    spec: dict[str, Any] = {"shape": list(weight.shape)}
    tensors = {"mask": pack_bits(mask.cpu())}
    if values == "model":
        tensors["values"] = weight[mask].contiguous()
        spec["values"] = _dtype_name(weight.dtype)
        return tensors, spec
    codes, scales, group, codebook = quantize_values(weight, mask, values, group_size)
    if codebook is not None:  # 4-bit codes
        codes = F.pad(codes, (0, codes.numel() % 2))
        codes = codes[0::2] | (codes[1::2] << 4)  # two codes per byte, low nibble first (the kernel's order)
        spec["codebook"] = codebook
    tensors.update(values=codes.contiguous(), scales=scales.contiguous())
    spec.update(values=values, group_size=group)
    return tensors, spec


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    require(name in ("float32", "bfloat16", "float16"), f"export: cannot compress {name} weights")
    return name


@torch.no_grad()
def compressed_state(model: nn.Module, masks: MaskSet, values: str = "model", group_size: int = 128):
    """(every tensor of the checkpoint, its metadata): the masked projections compressed, every other tensor as
    ``model.state_dict()`` has it, tied copies once."""
    SparseValuesArguments(values, group_size)  # the settings' own one-line checks
    modules = masks.check_matches(model)
    tensors: dict[str, torch.Tensor] = {}
    specs = {}
    for name, module in modules.items():
        with gathered([module.weight]):
            weight = logical_weight(module).detach().cpu()
        mask = masks.masks[name].cpu()
        stray = int((weight[~mask] != 0).sum())
        require(stray == 0, f"export: {name} has {stray} nonzero weights outside its mask; they would be lost")
        stored, spec = compress_projection(weight, mask, values, group_size)
        spec["transposed"] = is_transposed(module)
        specs[name] = spec
        tensors.update({f"{name}.weight.{part}": tensor for part, tensor in stored.items()})
    skipped = {f"{name}.weight" for name in modules}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if key in skipped or tensor.data_ptr() in seen:
            continue  # a tied copy (lm_head of tied embeddings) is stored once, as save_pretrained does
        seen.add(tensor.data_ptr())
        tensors[key] = tensor.detach().cpu()
    metadata = {
        "format": FORMAT,
        "projections": json.dumps(specs, sort_keys=True),
        "masks_digest": masks.digest(),
    }
    return tensors, metadata


def export_compressed(
    model: nn.Module, tokenizer, masks: MaskSet, target: str | Path, values: str = "model", group_size: int = 128
) -> Path:
    """Write ``model`` as a compressed checkpoint to ``target`` in one atomic step (the format:
    :mod:`dlp.compressed.modeling_compressed`): weights, config, tokenizer, generation config and the two
    remote-code files."""
    tensors, metadata = compressed_state(model, masks, values, group_size)
    target = Path(target)
    with atomic_dir(target, size=file_size(tensors, metadata)) as tmp:
        write_tensors(tmp / WEIGHTS_NAME, tensors, metadata)
        _compressed_config(model, values, group_size).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        for source in SHIPPED:
            shutil.copyfile(source, tmp / source.name)
    return target


def _compressed_config(model: nn.Module, values: str, group_size: int) -> DlpCompressedConfig:
    base = model.config.to_dict()
    config = DlpCompressedConfig(
        base_config=base,
        dlp_compressed={"format": FORMAT, "values": values, "group_size": group_size if values in QUANTIZED else 0},
        architectures=["DlpCompressedForCausalLM"],
    )
    config.auto_map = dict(AUTO_MAP)
    return config


def compressed_dir(dense_dir: str | Path) -> Path:
    """Where the sparse copy of an export goes: ``model-sparse/`` beside ``model/``."""
    dense_dir = Path(dense_dir)
    return dense_dir.with_name(f"{dense_dir.name}-sparse")


def export_formats(model: nn.Module, tokenizer, masks: MaskSet | None, target: str | Path, export: ExportArguments):
    """Write the exports ``export`` asks for: the dense one to ``target``, the compressed one to
    :func:`compressed_dir` (``target`` itself when it is the only one). Returns the directories written."""
    target = Path(target)
    written = []
    if export.export_dense or masks is None:  # a model without masks (sliced) has no compressed form
        written.append(export_model(model, tokenizer, masks, target))
    if export.export_sparse and masks is not None:
        where = compressed_dir(target) if export.export_dense else target
        written.append(
            export_compressed(model, tokenizer, masks, where, export.export_values, export.export_group_size)
        )
    return written


def checkpoint_sizes(path: str | Path) -> dict[str, Any]:
    """What a compressed export weighs, read from its header: the pruned projections' stored bytes against the same
    projections dense in bfloat16 (2 bytes a weight; the physical limit at sparsity s is (1 - s) · value bytes / 2
    + 1/16), and the whole weight file against the model dense in bfloat16."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / WEIGHTS_NAME), framework="pt") as handle:
        specs = json.loads(handle.metadata()["projections"])
        stored = projections = dense = 0
        for key in handle.keys():
            tensor = handle.get_slice(key)
            nbytes = _slice_bytes(tensor)
            owner = key.rpartition(".weight.")[0]
            if owner in specs:
                stored += nbytes
            else:
                dense += math.prod(tensor.get_shape()) * 2
        for spec in specs.values():
            projections += math.prod(spec["shape"]) * 2
    file_bytes = (Path(path) / WEIGHTS_NAME).stat().st_size
    return {
        "file_bytes": file_bytes,
        "projection_bytes": stored,
        "projection_bf16_bytes": projections,
        "projection_ratio": stored / max(projections, 1),
        "file_ratio": file_bytes / max(projections + dense, 1),
    }


def _slice_bytes(tensor) -> int:
    return math.prod(tensor.get_shape()) * DTYPE_BYTES[tensor.get_dtype()]
