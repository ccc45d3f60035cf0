"""Reading a prunable projection's weight whatever form it is stored in: dense, 4-bit packed (bitsandbytes), a
ZeRO-3 shard, and in either orientation (``nn.Linear`` or GPT-2's ``Conv1D``).

Mask checks, pruning and mask-exact LoRA need the *logical* weight, ``[out_features, in_features]``. A 4-bit
weight is a packed uint8 buffer with a quantization state; a ZeRO-3 weight is an empty placeholder whose full
value lives spread over the ranks; a ``transformers`` ``Conv1D`` (GPT-2) stores its weight transposed,
``[in_features, out_features]``, and computes ``x @ W + b``. These helpers give the logical shape and the dense
logical values, so callers never special-case any of them. Masks are always logical: a 4-bit load turns a
``Conv1D`` into a ``Linear4bit`` in ``[out, in]`` layout, and the same masks still match it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def is_quantized(weight: torch.Tensor | None) -> bool:
    """A bitsandbytes 4-bit parameter (packed codes plus a quantization state)."""
    return getattr(weight, "quant_state", None) is not None


def is_zero3_shard(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_shape")


def full_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """A weight tensor's full (unpacked, ungathered) shape, also when it is 4-bit packed or a ZeRO-3 shard; in the
    module's storage orientation (a ``Conv1D``'s is ``[in, out]``: see :func:`logical_shape`)."""
    if is_quantized(weight):
        return tuple(weight.quant_state.shape)
    return tuple(getattr(weight, "ds_shape", weight.shape))


def dense_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight as a dense floating-point tensor: dequantized when it is 4-bit, itself otherwise."""
    if is_quantized(weight):
        from .quantize import dequantize_4bit

        weight = dequantize_4bit(weight)  # either layout bitsandbytes may hold it in
    return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)


def is_transposed(module: nn.Module) -> bool:
    """Whether ``module`` stores its weight as ``[in, out]``: a ``transformers`` ``Conv1D`` (GPT-2's projections).

    ``transformers.pytorch_utils`` is not imported here (half a second): a module of that class cannot exist
    unless it is already loaded."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def logical_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a projection, also when its weight is transposed, 4-bit or a shard."""
    rows, cols = full_shape(module.weight)
    return (cols, rows) if is_transposed(module) else (rows, cols)


def in_features(module: nn.Module) -> int:
    """The width of the projection's input (the columns of its logical weight)."""
    return logical_shape(module)[1]


def logical_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The projection's weight as a dense ``[out, in]`` tensor (a 4-bit weight dequantized).

    For a dense weight in its own dtype this is the parameter itself or, for a ``Conv1D``, its transposed
    *view*, so in-place ops (``mul_``, ``copy_``) on the result write through to the module."""
    weight = dense_weight(module.weight, dtype)
    return weight.t() if is_transposed(module) else weight


def to_storage(module: nn.Module, logical: torch.Tensor) -> torch.Tensor:
    """A logical ``[out, in]`` tensor laid out as ``module`` stores its weight (transposed for a ``Conv1D``)."""
    return logical.t() if is_transposed(module) else logical


@contextlib.contextmanager
def gathered(weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside, ZeRO-3 shards among ``weights`` hold their full values (a collective: every rank must enter)."""
    shards = [w for w in weights if is_zero3_shard(w)]
    if not shards:
        yield
        return
    from deepspeed import zero

    with zero.GatheredParameters(shards, modifier_rank=None):
        yield
