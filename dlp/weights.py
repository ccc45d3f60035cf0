"""Reading a Linear's weight whatever form it is stored in: dense, 4-bit packed (bitsandbytes) or a ZeRO-3 shard.

Mask checks and mask-exact LoRA need the *logical* weight. A 4-bit weight is a packed uint8 buffer with a
quantization state; a ZeRO-3 weight is an empty placeholder whose full value lives spread over the ranks. These
helpers give the logical shape and the dense values, so callers never special-case either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


def is_quantized(weight: torch.Tensor | None) -> bool:
    """A bitsandbytes 4-bit parameter (packed codes plus a quantization state)."""
    return getattr(weight, "quant_state", None) is not None


def is_zero3_shard(weight: torch.Tensor) -> bool:
    return hasattr(weight, "ds_shape")


def full_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """A weight's logical shape, also when it is 4-bit packed or a ZeRO-3 shard."""
    if is_quantized(weight):
        return tuple(weight.quant_state.shape)
    return tuple(getattr(weight, "ds_shape", weight.shape))


def dense_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight as a dense floating-point tensor: dequantized when it is 4-bit, itself otherwise."""
    if is_quantized(weight):
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)


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
