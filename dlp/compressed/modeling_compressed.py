"""Compressed checkpoints of pruned models: each pruned projection stored as its mask bits and its kept values.

This file depends on torch, numpy, safetensors and transformers only: it is shipped inside every compressed model
that dlp exports (with ``sparse_kernel.py``), so
``AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)`` loads the model without dlp, in one of
two modes (``compressed_mode=``):

* ``"sparse"`` (the default): every pruned projection becomes a :class:`SparseLinear` that keeps its weight
  compressed and multiplies on it directly (``sparse_kernel``): the model stays as small in memory as on disk, and
  decoding reads a third of the bytes at 70% sparsity;
* ``"dense"``: the weights are decompressed into the architecture's own model class (Llama, GPT-2, ...), which is
  then bitwise equal to the dense export when the kept values are stored in the model's dtype.

The checkpoint (format :data:`FORMAT`) is ``model.safetensors`` plus config and tokenizer. For a projection
``P`` with logical weight W [out, in] (a GPT-2 Conv1D stores Wᵀ: ``transposed``) it holds

* ``P.weight.mask``: W's keep-mask, flattened row by row, 8 weights per byte, most significant bit first (dlp's
  mask-file layout);
* ``P.weight.values``: the kept weights in that order, in the model's dtype, or quantized: int8 codes, or 4-bit
  codes packed two per byte (low nibble first) into the 16-entry ``codebook`` of the projection's spec (NF4);
* ``P.weight.scales`` (quantized only): float16 [out, ceil(in / group_size)], the step of each output row's group
  of ``group_size`` columns (a group the width of the row: one step per output channel); a weight is its code's
  value times its group's step.

Every other tensor is stored as it is. ``config.json`` has ``model_type: dlp_compressed``, so a loader without
``trust_remote_code`` refuses it instead of building the architecture with its pruned projections missing; the
architecture's own config is kept under ``base_config``.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .sparse_kernel import MAX_TOKENS, PAD_BYTES, VALUE_KINDS, kernel, kernel_unavailable

FORMAT = "dlp-compressed/1"
MODEL_TYPE = "dlp_compressed"
WEIGHTS_NAME = "model.safetensors"
QUANTIZED = ("int8", "int4", "nf4")  # value formats with codes and steps
_said: set[str] = set()


def _say_once(message: str) -> None:
    """One line on stderr, once per process: why a layer uses the dense kernel."""
    if message not in _said:
        _said.add(message)
        print(f"[dlp] {message}", file=sys.stderr)


def row_bits(flat_bits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The file's flattened mask bits → uint8 [out, ceil(in / 8)] as the kernel reads them: each row starting on a
    byte, column j of a byte in bit j (least significant first, as the kernel's tables are indexed)."""
    out, inn = shape
    mask = np.unpackbits(flat_bits.numpy(), count=out * inn).reshape(out, inn)
    return torch.from_numpy(np.packbits(mask, axis=1, bitorder="little"))


def unpack_mask(flat_bits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The file's mask bits → bool [out, in]."""
    return torch.from_numpy(np.unpackbits(flat_bits.numpy(), count=math.prod(shape)).view(bool).reshape(shape))


def dequantized(values: torch.Tensor, spec: dict[str, Any], count: int) -> torch.Tensor:
    """The ``count`` kept values as float32, before scaling: 4-bit codes looked up, int8 widened, float ones cast."""
    if "codebook" in spec:  # 4-bit codes
        codes = torch.stack([values & 0x0F, values >> 4], dim=1).reshape(-1)[:count].long()
        return torch.tensor(spec["codebook"], dtype=torch.float32)[codes]
    return values[:count].float()


def dense_weight(entry: dict[str, torch.Tensor], spec: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """One projection's logical weight [out, in] in ``dtype`` from its stored tensors (pure torch: no kernel)."""
    return placed(unpack_mask(entry["mask"], tuple(spec["shape"])), entry, spec, dtype)


def placed(mask: torch.Tensor, entry: dict[str, torch.Tensor], spec: dict[str, Any], dtype) -> torch.Tensor:
    """The kept values (dequantized and scaled) at the mask's positions, zeros elsewhere, in ``dtype``. Values in
    the model's dtype are placed as they are, so the weight is bitwise the dense export's."""
    shape = tuple(spec["shape"])
    count = int(mask.sum())
    if spec["values"] not in QUANTIZED:
        weight = torch.zeros(shape, dtype=entry["values"].dtype)
        weight[mask] = entry["values"][:count]
        return weight.to(dtype)
    weight = torch.zeros(shape, dtype=torch.float32)
    weight[mask] = dequantized(entry["values"], spec, count)
    steps = entry["scales"].float().repeat_interleave(spec["group_size"], dim=1)[:, : shape[1]]
    return (weight * steps).to(dtype)


class SparseLinear(nn.Module):
    """A pruned projection kept compressed: ``y = x Wᵀ + b`` computed on the mask bits and kept values.

    Up to :data:`~.sparse_kernel.MAX_TOKENS` tokens per call (decoding) it runs the compiled kernel; for more (a
    prompt) it decompresses the weight for that call and runs the dense kernel, which is faster for a
    matrix-matrix product. Without a compiled kernel it decompresses once, keeps the dense weight, and says so."""

    def __init__(self, entry: dict[str, torch.Tensor], spec: dict[str, Any], bias: torch.Tensor | None, dtype):
        super().__init__()
        self.out_features, self.in_features = spec["shape"]
        self.spec = spec
        self.dtype = dtype
        self.kind = VALUE_KINDS[spec["values"]]
        self.register_buffer("bits", row_bits(entry["mask"], tuple(spec["shape"])))
        pad = torch.zeros(PAD_BYTES, dtype=torch.uint8).view(entry["values"].dtype)
        self.register_buffer("values", torch.cat([entry["values"].reshape(-1), pad]))
        scales = entry.get("scales")
        self.register_buffer("scales", scales.float().contiguous() if scales is not None else torch.empty(0))
        self.register_buffer("codebook", torch.tensor(spec.get("codebook", []), dtype=torch.float32))
        self.group_size = spec.get("group_size") or 8 * self.bits.shape[1]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.row_ptr: torch.Tensor | None = None
        self.dense: torch.Tensor | None = None  # kept only when no kernel can run here

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, values={self.spec['values']}"

    def _kernel(self):
        if kernel_unavailable() is not None:
            return None
        try:
            module = kernel()
        except RuntimeError:
            return None
        if self.row_ptr is None:
            counts = module.row_counts(self.bits)
            self.row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return module

    def weight_dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole weight [out, in] on the layer's device, decompressed (by the kernel when it runs here; on
        another device, from CPU copies)."""
        device = self.bits.device
        module = self._kernel() if device.type == "cpu" else None
        if module is None:
            entry = {"values": self.values.cpu(), "scales": self.scales.cpu()}
            return placed(self._mask(), entry, {**self.spec, "group_size": self.group_size}, dtype).to(device)
        name = str(dtype).removeprefix("torch.")
        out = VALUE_KINDS[name] if name in ("float32", "bfloat16", "float16") else 0
        dense = module.decompress(
            self.bits, self.row_ptr, self.values, self.kind, self.codebook, self.scales, self.group_size, out
        )
        return dense[:, : self.in_features].to(dtype)

    def _mask(self) -> torch.Tensor:
        """The keep-mask [out, in] from the kernel's row bits."""
        bits = np.unpackbits(self.bits.cpu().numpy(), axis=1, bitorder="little")[:, : self.in_features]
        return torch.from_numpy(bits.astype(bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // self.in_features
        module = self._kernel() if x.device.type == "cpu" and not torch.is_grad_enabled() else None
        if module is None or tokens > MAX_TOKENS:
            if module is None:
                reason = kernel_unavailable() or "gradients or a non-CPU device"
                _say_once(f"sparse kernel not used ({reason}): each layer decompressed once, dense kernel")
                if self.dense is None:
                    self.dense = self.weight_dense(x.dtype)
                weight = self.dense
            else:
                weight = self.weight_dense(x.dtype)  # a prompt: decompressed for this call only
            return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        flat = x.reshape(tokens, self.in_features)
        if flat.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            flat = flat.float()
        y = module.sparse_matmul(
            flat.contiguous(),
            self.bits,
            self.row_ptr,
            self.values,
            self.kind,
            self.codebook,
            self.scales,
            self.group_size,
        )
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class DlpCompressedConfig(PretrainedConfig):
    """The config of a compressed checkpoint: the architecture's own config (``base_config``) and the format
    (``dlp_compressed``). Its own model type makes transformers refuse the checkpoint without remote code."""

    model_type = MODEL_TYPE

    def __init__(self, base_config: dict | None = None, dlp_compressed: dict | None = None, **kwargs):
        self.base_config = base_config or {}
        self.dlp_compressed = dlp_compressed or {}
        super().__init__(**kwargs)

    def architecture_config(self) -> PretrainedConfig:
        base = dict(self.base_config)
        return AutoConfig.for_model(base.pop("model_type"), **base)


def open_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], Callable]:
    """(every plain tensor, each projection's spec, ``read(name)`` → that projection's {mask, values[, scales]}).

    Memory: the plain tensors (embeddings, norms) stay views of the file's memory map, as transformers' own loader
    keeps them, so an embedding's rows are read from disk only when a token needs them. Each projection is read
    through a map of its own, copied out (its layer keeps its own layout) and that map closed, so the pages read
    for it do not stay resident beside the copies (with one map for all of them, loading a 1B model peaked 960 MiB
    above where it settled); one at a time, so a loader turns each into its final form before the next is read
    and never holds the model twice."""
    weights = str(Path(path) / WEIGHTS_NAME)
    with safe_open(weights, framework="pt") as handle:
        meta = handle.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a dlp compressed checkpoint (format {meta.get('format')!r})")
        specs = json.loads(meta["projections"])
        parts: dict[str, list[str]] = {name: [] for name in specs}
        plain = {}
        for key in handle.keys():
            owner, _, part = key.rpartition(".weight.")
            if owner in specs:
                parts[owner].append(part)
            else:
                plain[key] = handle.get_tensor(key)

    def read(name: str) -> dict[str, torch.Tensor]:
        with safe_open(weights, framework="pt") as projection:  # its own map, closed with the copies made
            return {part: projection.get_tensor(f"{name}.weight.{part}").clone() for part in parts[name]}

    return plain, specs, read


def _architecture_class(base: PretrainedConfig):
    import transformers

    for name in base.architectures or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(base)]


def _stored_weight(dense: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    return dense.t().contiguous() if spec.get("transposed") else dense


def load_dense(path: str | Path, config: DlpCompressedConfig, **kwargs) -> nn.Module:
    """The architecture's own model with every weight decompressed (``from_pretrained`` on the state dict)."""
    plain, specs, read = open_checkpoint(path)
    quantized_dtype = _float_dtype(plain)
    for name, spec in specs.items():
        entry = read(name)
        dtype = entry["values"].dtype if spec["values"] not in QUANTIZED else quantized_dtype
        plain[f"{name}.weight"] = _stored_weight(dense_weight(entry, spec, dtype), spec)
    base = config.architecture_config()
    model = _architecture_class(base).from_pretrained(None, config=base, state_dict=plain, **kwargs)
    _load_generation_config(model, path)
    return model.eval()


def _float_dtype(plain: dict[str, torch.Tensor]) -> torch.dtype:
    """The model's float dtype, for weights whose values were quantized: that of its other floating tensors."""
    for tensor in plain.values():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


@contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, no initialisation) and buffers real:
    the compressed projections' dense weights are never allocated, and computed buffers (rotary frequencies)
    keep their values."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_sparse(path: str | Path, config: DlpCompressedConfig, attn_implementation: str | None = None) -> nn.Module:
    """The architecture's own model with every pruned projection a :class:`SparseLinear` (CPU, eval mode)."""
    base = config.architecture_config()
    with _parameters_on_meta():
        attention = {"attn_implementation": attn_implementation} if attn_implementation else {}  # else transformers'
        model = _architecture_class(base)._from_config(base, **attention)  # default for the architecture
    plain, specs, read = open_checkpoint(path)
    dtype = _float_dtype(plain)
    for name, spec in specs.items():  # one projection in memory twice at a time, not the model
        bias = plain.pop(f"{name}.bias", None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, SparseLinear(read(name), spec, bias, dtype))
    for key, tensor in plain.items():
        owner, _, leaf = key.rpartition(".")
        target = model.get_submodule(owner)
        if leaf in target._parameters:
            target._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            target._buffers[leaf] = tensor
    model.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.device.type == "meta"]
    if missing:
        raise ValueError(f"{path}: the checkpoint has no tensor for {missing[:3]}")
    _load_generation_config(model, path)
    return model.eval()


def _load_generation_config(model: nn.Module, path: str | Path) -> None:
    if (Path(path) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))


class DlpCompressedForCausalLM:
    """What ``auto_map`` names: not a model class itself, its ``from_pretrained`` returns the architecture's own
    model class, sparse or decompressed (see the module docstring)."""

    config_class = DlpCompressedConfig

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = None) -> None:
        """transformers registers a remote class with its Auto class; the returned models are not this class."""

    @classmethod
    def from_pretrained(
        cls, path, *args, config: DlpCompressedConfig | None = None, compressed_mode: str = "sparse", **kwargs
    ) -> nn.Module:
        if compressed_mode not in ("sparse", "dense"):
            raise ValueError(f"compressed_mode must be 'sparse' or 'dense' (got {compressed_mode!r})")
        config = config or DlpCompressedConfig.from_pretrained(path)
        for key in (
            "trust_remote_code",
            "adapter_kwargs",
            "_from_auto",
            "cache_dir",
            "revision",
            "token",
            "local_files_only",
            "subfolder",
            "code_revision",
            "_commit_hash",
        ):
            kwargs.pop(key, None)
        if compressed_mode == "dense":
            return load_dense(path, config, **kwargs)
        return load_sparse(path, config, kwargs.get("attn_implementation"))
