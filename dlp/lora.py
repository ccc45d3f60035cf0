"""Mask-exact LoRA on top of peft (no fork): the adapter's update lives only where the mask keeps weights.

A pruned Linear computes with ``W ⊙ M`` (``W`` is already zero off the mask). Plain LoRA adds ``s·B·A``, which is
dense, so after ``merge_and_unload`` every pruned weight comes back to life. Here the layer computes with

    W_eff = W + s·(B·A) ⊙ M

and merging writes exactly ``W_eff`` into the base weight, so the merged model *is* the trained model, bit for
bit, and every pruned weight is exactly 0 at every step and after the merge.

Cost: building ``W_eff`` and running one ``F.linear`` replaces peft's base matmul plus two rank-r matmuls; the
gradients of A and B need ``(dY^T X) ⊙ M``, one extra weight-sized matmul per Linear (measured by
``benchmarks/lora_step.py``). Dropout on the adapter input (``lora_dropout > 0``) forces a second weight-sized
matmul in forward and backward, so mask-exact recipes use ``lora_dropout: 0``.

How it hooks in: peft builds its usual ``lora.Linear`` wrappers; :func:`attach_masks` turns each wrapper of a
masked Linear into :class:`MaskedLoraLinear` (a subclass that only overrides ``forward`` and
``get_delta_weight``) and hands it its mask. Everything else — saving adapters, loading them, checkpoints,
``merge_and_unload`` — is peft's own code, which now merges the masked delta.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DlpError, require
from .masks import MaskSet

PEFT_PREFIX = "base_model.model."


class MaskedLoraMixin:
    """Overrides of a peft LoRA layer that confine every adapter's delta to the layer's keep-mask."""

    dlp_mask: torch.Tensor  # bool [out, in], True = keep; a plain attribute, so DDP never broadcasts it

    def _mask_like(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dlp_mask.device != tensor.device:
            self.dlp_mask = self.dlp_mask.to(tensor.device)
        return self.dlp_mask

    def _base_weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    def masked_delta(self, adapter: str, dtype: torch.dtype) -> torch.Tensor:
        """``s·(B·A) ⊙ M`` in ``dtype``: the one expression used by forward and merge, so they agree exactly."""
        delta = (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]
        return (delta * self._mask_like(delta)).to(dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:  # called by peft's merge/unmerge
        return self.masked_delta(adapter, self._base_weight().dtype)

    def _adapters_in_use(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.lora_A]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = self._adapters_in_use()
        if self.disable_adapters or self.merged or not adapters or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)  # peft's paths for these cases never add an unmasked delta
        weight = self._base_weight()
        dropped = [a for a in adapters if self.training and not isinstance(self.lora_dropout[a], nn.Identity)]
        x = x.to(weight.dtype)
        for adapter in adapters:
            if adapter not in dropped:
                weight = weight + self.masked_delta(adapter, weight.dtype)
        result = F.linear(x, weight, self.get_base_layer().bias)
        for adapter in dropped:  # the adapter sees dropout(x) while the base sees x: a second matmul
            result = result + F.linear(self.lora_dropout[adapter](x), self.masked_delta(adapter, weight.dtype))
        return result


_MASKED_CLASSES: dict[type, type] = {}


def masked_class(layer_class: type) -> type:
    """The mask-exact subclass of a peft LoRA layer class (built once per class)."""
    if issubclass(layer_class, MaskedLoraMixin):
        return layer_class
    if layer_class not in _MASKED_CLASSES:
        _MASKED_CLASSES[layer_class] = type(f"Masked{layer_class.__name__}", (MaskedLoraMixin, layer_class), {})
    return _MASKED_CLASSES[layer_class]


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA wrappers by the name of the Linear they wrap in the base model."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            found[name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name] = module
    return found


def attach_masks(model: nn.Module, masks: MaskSet) -> int:
    """Make every LoRA layer of a pruned Linear mask-exact. Returns how many layers were converted.

    LoRA layers of Linears that were not pruned (no mask) stay plain peft layers. The base weights must already
    be zero off the mask (a pruned model loaded from disk is); that is checked, not assumed.
    """
    layers = lora_layers(model)
    require(layers, "lora: the model has no LoRA layers (check lora_target_modules)")
    converted = 0
    for name, layer in layers.items():
        if name not in masks.masks:
            continue
        require(not getattr(layer, "fan_in_fan_out", False), f"lora: {name} stores its weight transposed (Conv1D); "
                "mask-exact LoRA supports nn.Linear layers")
        mask = masks.masks[name]
        weight = layer.get_base_layer().weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise DlpError(f"lora: mask for {name} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}")
        require(isinstance(weight, nn.Parameter) and weight.dtype.is_floating_point,
                f"lora: {name} has a quantized base weight; mask-exact LoRA needs a floating-point base here")
        layer.__class__ = masked_class(type(layer))
        layer.dlp_mask = mask.to(device=weight.device, dtype=torch.bool)
        converted += 1
    require(converted > 0, "lora: no LoRA layer wraps a pruned Linear (lora_target_modules and the masks do not meet)")
    return converted


def masked_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: layer for name, layer in lora_layers(model).items() if isinstance(layer, MaskedLoraMixin)}
