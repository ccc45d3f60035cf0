"""4-bit (QLoRA) bases: the recipe's ``load_in_4bit`` fields → a bitsandbytes ``BitsAndBytesConfig``.

The fields are trl's ``ModelConfig`` ones (``load_in_4bit``, ``bnb_4bit_quant_type``, ``use_bnb_nested_quant``)
plus ``dtype`` as the compute dtype, so a QLoRA recipe reads like any trl recipe. Only 4-bit is supported: an
8-bit base has no exact zero in its outlier path, so masks could not be kept exact there.

NF4 and FP4 both have an exact zero code, so the pruned zeros of a base survive quantization exactly; small kept
weights may also round to zero, which is why the masks are kept explicitly rather than read off the weights.
"""

from __future__ import annotations

import torch

from .errors import require

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_quantization_args(model_args) -> None:
    require(
        not getattr(model_args, "load_in_8bit", False),
        "load_in_8bit is not supported: mask-exact LoRA needs a full-precision or 4-bit (load_in_4bit) base",
    )
    if getattr(model_args, "load_in_4bit", False):
        require(
            model_args.bnb_4bit_quant_type in QUANT_TYPES,
            f"bnb_4bit_quant_type must be one of {', '.join(QUANT_TYPES)} (got {model_args.bnb_4bit_quant_type!r})",
        )
        require(
            (model_args.dtype or "float32") in COMPUTE_DTYPES,
            f"dtype (the 4-bit compute dtype) must be one of {', '.join(COMPUTE_DTYPES)} (got {model_args.dtype!r})",
        )


def bnb_config(model_args, always: bool = False):
    """The ``BitsAndBytesConfig`` of a ``load_in_4bit`` recipe, or None for a full-precision base (``always``:
    build it from the ``bnb_4bit_*`` fields even so, e.g. to export a 4-bit copy of a 16-bit run)."""
    check_quantization_args(model_args)
    if not (always or getattr(model_args, "load_in_4bit", False)):
        return None
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, model_args.dtype or "float32")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bool(model_args.use_bnb_nested_quant),
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=torch.uint8,
    )


def prepare_4bit_for_training(model, activation_checkpointing: bool):
    """Freeze a 4-bit base for adapter training, with activation checkpointing when asked.

    This is peft's ``prepare_model_for_kbit_training`` less one step: that function also casts every parameter
    that is not 4-bit (embeddings, the LM head, the norms) from the compute dtype to float32. The embeddings then
    emit float32 hidden states, so a bf16 QLoRA run keeps its whole residual stream and every activation saved for
    the backward pass in float32. On the 1.1B kit model (H200, 4×2048) the QLoRA pipeline peaked at 27.4 GB,
    *above* 16-bit LoRA's 20.0 GB, which is the opposite of what a 4-bit base is for. Here the base stays in the
    dtype it was loaded in, as a 16-bit LoRA base does; a float32 run (the CPU recipes) is unchanged."""
    for param in model.parameters():
        param.requires_grad_(False)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass; the inputs need gradients for a frozen base."""
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def keep_canonical_4bit_layout(model) -> int:
    """Keep bitsandbytes from repacking ``model``'s 4-bit weights for its AVX512-BF16 CPU kernel; returns how
    many layers were switched off that path.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without grad rewrites its weight in place into
    another layout (``packing_format_for_cpu``) the first time it runs. dlp keeps every 4-bit weight in the one
    canonical layout, on every CPU, because that repacking (1) fails outright on shapes it cannot tile (an input
    width below the quantization block size, an output width not a multiple of 32); (2) rounds the absmax scales to
    bfloat16, so the weight no longer dequantizes to the values the adapter was trained against and a
    ``merge_base: dequantized`` merge would stop being exact; (3) makes results depend on which CPU a run lands on.
    The price is the packed kernel's speed for 4-bit *inference* on such CPUs; training never used it.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def dequantize_4bit(weight: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes 4-bit parameter as a dense tensor, whichever layout bitsandbytes holds it in.

    A weight that was already repacked for the CPU kernel (a model dlp did not load itself) is unpacked on a copy
    of its quantization state first; the parameter itself is left as it is."""
    import copy

    import bitsandbytes.functional as bnb_functional

    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        packed_absmax = state.absmax  # [K / blocksize, N] in bfloat16 once packed
        data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
        # bitsandbytes' inverse restores the scales only for nested quantization, and then re-quantizes them;
        # the packed scales themselves, back in [N, K / blocksize] order, are what the packed kernel computes with
        state.absmax, state.nested = packed_absmax.t().reshape(-1).float(), False
    return bnb_functional.dequantize_4bit(data, state)
