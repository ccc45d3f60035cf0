"""Mask-exact LoRA on top of peft (no fork): the adapter's update lives only where the mask keeps weights.

A pruned Linear computes with ``W ⊙ M`` (``W`` is already zero off the mask). Plain LoRA adds ``s·B·A``, which is
dense, so after ``merge_and_unload`` every pruned weight comes back to life. Here the layer computes with

    W_eff = W + s·(B·A) ⊙ M

and merging writes exactly ``W_eff`` into the base weight, so the merged model *is* the trained model, bit for
bit, and every pruned weight is exactly 0 at every step and after the merge.

Cost: building ``W_eff`` and running one ``F.linear`` replaces peft's base matmul plus two rank-r matmuls; the
gradients of A and B need ``(dY^T X) ⊙ M``, one extra weight-sized matmul per Linear (measured by
``benchmarks/lora_step.py``). Backward rebuilds ``W_eff`` instead of keeping it, so training holds no dense copy
of any weight between forward and backward: that is what lets a 4-bit base (QLoRA) stay 4-bit in memory, the
base being dequantized one Linear at a time. Masks live on the device bit-packed (1 bit per weight). Dropout on
the adapter input (``lora_dropout > 0``) forces a second weight-sized matmul in forward and backward, so
mask-exact recipes use ``lora_dropout: 0``.

Under DeepSpeed ZeRO-3 the layer reads its base and adapter weights outside their modules' own ``forward``, so
:func:`attach_masks` registers them as external parameters of the wrapper: ZeRO-3 then gathers them around the
wrapper's forward and backward, and the masks apply to the gathered (full) weights.

A GPT-2 ``Conv1D`` stores its weight transposed, ``[in, out]``; peft wraps it with ``fan_in_fan_out=True``. The
layer computes with the *logical* ``[out, in]`` weight (:func:`dlp.projections.logical_weight`), like the masks, and
only :meth:`MaskedLoraMixin.get_delta_weight` (what peft's merge adds to the stored weight) hands the delta back in
the storage orientation.

How it hooks in: peft builds its usual ``lora.Linear`` wrappers; :func:`attach_masks` turns each wrapper of a
masked Linear into :class:`MaskedLoraLinear` (a subclass that only overrides ``forward`` and
``get_delta_weight``) and hands it its mask. Everything else — saving adapters, loading them, checkpoints,
``merge_and_unload`` — is peft's own code, which now merges the masked delta.

:func:`masked_lora_model` assembles a compressed model's adapters: peft's ``LoraConfig`` from the recipe's LoRA
fields (:func:`lora_config`), every prunable projection kind by default (:func:`default_target_modules`), and the
masks attached when the model has any (a sliced model's adapters stay peft's own).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import zero3_enabled
from .errors import DlpError, require
from .masks import MaskSet, pack_bits, unpack_bits
from .modeling import prunable_linears
from .projections import is_quantized, is_transposed, logical_shape, logical_weight, to_storage

PEFT_PREFIX = "base_model.model."


class _MaskedLoraLinear(torch.autograd.Function):
    """``y = x·W_effᵀ + b`` with ``W_eff = W + (s·B)·A ⊙ M``; saves ``x``, ``A`` and ``B`` and rebuilds ``W_eff``
    in backward, so no weight-sized tensor is kept per Linear between forward and backward.

    ``x`` arrives in the dtype to compute in: the base weight's, or autocast's (``bf16: true``, on a GPU or on a
    CPU with bf16 matrix units), where ``W_eff`` is built in the base dtype and rounded once, as autocast rounds
    a plain Linear's weight. The scale ``s`` sits on the small factor ``B``, never on a weight-sized tensor."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, layer: "MaskedLoraMixin", adapter: str
    ) -> torch.Tensor:
        ctx.save_for_backward(x, lora_a, lora_b)
        ctx.layer, ctx.adapter = layer, adapter
        return layer.linear([adapter], x, layer.keep_mask(x.device))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, lora_a, lora_b = ctx.saved_tensors
        layer, adapter = ctx.layer, ctx.adapter
        mask = layer.keep_mask(grad_out.device)  # unpacked once for both gradients
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ layer.effective_weight([adapter], layer.compute_dtype(), mask).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight = grad_out.flatten(0, -2).t() @ x.flatten(0, -2)  # dL/dW_eff, [out, in]
            grad_delta = grad_weight.to(lora_a.dtype) * mask  # dL/d((s·B)·A)
            scaling = layer.scaling[adapter]
            grad_b = (grad_delta @ lora_a.t()) * scaling
            grad_a = (lora_b * scaling).t() @ grad_delta
        return grad_x, grad_a, grad_b, None, None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on ``device``, or None when autocast is off there."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class MaskedLoraMixin:
    """Overrides of a peft LoRA layer that confine every adapter's delta to the layer's keep-mask."""

    dlp_mask_bits: torch.Tensor  # uint8, dlp.masks.pack_bits of the [out, in] mask: a plain attribute, so DDP
    dlp_mask_shape: tuple[int, int]  # never broadcasts it

    def keep_mask(self, device: torch.device) -> torch.Tensor:
        """The bool keep-mask [out, in] (True = keep), unpacked on ``device`` for the duration of one use."""
        if self.dlp_mask_bits.device != device:
            self.dlp_mask_bits = self.dlp_mask_bits.to(device)
        return unpack_bits(self.dlp_mask_bits, self.dlp_mask_shape)

    def compute_dtype(self) -> torch.dtype:
        """The dtype the layer computes in: the base weight's, or a 4-bit base's compute dtype."""
        base = self.get_base_layer()
        if is_quantized(base.weight):
            return getattr(base, "compute_dtype", None) or base.weight.quant_state.dtype
        return base.weight.dtype

    def base_bias(self) -> torch.Tensor | None:
        bias = self.get_base_layer().bias
        return None if bias is None else bias.to(self.compute_dtype())

    def masked_delta(self, adapter: str, dtype: torch.dtype, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(s·B)·A ⊙ M`` in ``dtype``: the one expression used by forward and merge, so they agree exactly.
        ``mask``: the keep-mask already unpacked by the caller, if any."""
        delta = (self.lora_B[adapter].weight * self.scaling[adapter]) @ self.lora_A[adapter].weight
        return (delta * (self.keep_mask(delta.device) if mask is None else mask)).to(dtype)

    def effective_weight(
        self, adapters: list[str], dtype: torch.dtype, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``W + Σ s·(B·A) ⊙ M`` in ``dtype``, logical ``[out, in]`` (a Conv1D's stored weight read transposed);
        a 4-bit ``W`` is dequantized here, one Linear at a time."""
        weight = logical_weight(self.get_base_layer(), dtype)
        if adapters and mask is None:
            mask = self.keep_mask(weight.device)
        for adapter in adapters:
            weight = weight + self.masked_delta(adapter, dtype, mask)
        return weight

    def linear(self, adapters: list[str], x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x·W_effᵀ + b`` in ``x``'s dtype, ``W_eff`` built in the base dtype and rounded once (``mask``: as in
        :meth:`effective_weight`)."""
        weight = self.effective_weight(adapters, self.compute_dtype(), mask).to(x.dtype)
        bias = self.base_bias()
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The masked delta as peft's merge/unmerge adds it to the *stored* weight: transposed for a Conv1D
        (``fan_in_fan_out``), so the merged weight is exactly the logical ``W_eff`` the layer computed with."""
        return to_storage(self.get_base_layer(), self.masked_delta(adapter, self.compute_dtype()))

    def _adapters_in_use(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.lora_A]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapters = self._adapters_in_use()
        if self.disable_adapters or self.merged or not adapters or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)  # peft's paths for these cases never add an unmasked delta
        autocast = _autocast_dtype(x.device)  # a plain Linear would compute, and return, in this dtype
        with torch.autocast(x.device.type, enabled=False):  # W_eff is built in the base dtype, rounded once
            result = self._masked_forward(x.to(autocast or self.compute_dtype()), adapters)
        return result if autocast else result.to(x.dtype)

    def _masked_forward(self, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
        dropped = [a for a in adapters if self.training and not isinstance(self.lora_dropout[a], nn.Identity)]
        if len(adapters) == 1 and not dropped:
            adapter = adapters[0]
            return _MaskedLoraLinear.apply(x, self.lora_A[adapter].weight, self.lora_B[adapter].weight, self, adapter)
        # several adapters or dropout: plain autograd (keeps W_eff for backward)
        result = self.linear([a for a in adapters if a not in dropped], x)
        for adapter in dropped:  # the adapter sees dropout(x) while the base sees x: a second matmul
            result = result + F.linear(self.lora_dropout[adapter](x), self.masked_delta(adapter, x.dtype))
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
            found[name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name] = module
    return found


def attach_masks(model: nn.Module, masks: MaskSet) -> int:
    """Make every LoRA layer of a pruned Linear mask-exact. Returns how many layers were converted.

    LoRA layers of Linears that were not pruned (no mask) stay plain peft layers. The base weights must already
    be zero off the mask (a pruned model loaded from disk is; see :meth:`MaskSet.violations`). Under ZeRO-3 the
    weights the layer reads are registered as external parameters of the wrapper, so they are gathered for it.
    """
    layers = lora_layers(model)
    require(layers, "lora: the model has no LoRA layers (check lora_target_modules)")
    zero3 = zero3_enabled()
    converted = 0
    for name, layer in layers.items():
        if name not in masks.masks:
            continue
        base = layer.get_base_layer()
        require(
            bool(getattr(layer, "fan_in_fan_out", False)) == is_transposed(base),
            f"lora: {name}: fan_in_fan_out must be {is_transposed(base)} for a {type(base).__name__} layer",
        )
        mask, weight = masks.masks[name], base.weight
        if tuple(mask.shape) != logical_shape(base):
            raise DlpError(f"lora: mask for {name} has shape {tuple(mask.shape)}, the weight {logical_shape(base)}")
        require(
            is_quantized(weight) or weight.dtype.is_floating_point,
            f"lora: {name} has a {weight.dtype} base weight; mask-exact LoRA needs a floating-point or 4-bit base",
        )
        # A class swap, not a peft LoraVariant: a variant's forward receives the base layer's result already
        # computed (W·x), so the masked W_eff·x would run the weight-sized matmul twice; the subclass replaces it.
        layer.__class__ = masked_class(type(layer))
        layer.dlp_mask_bits = pack_bits(mask.to(device=weight.device, dtype=torch.bool))
        layer.dlp_mask_shape = tuple(mask.shape)
        if zero3:
            _register_external_weights(layer)
        converted += 1
    require(converted > 0, "lora: no LoRA layer wraps a pruned Linear (lora_target_modules and the masks do not meet)")
    return converted


def _register_external_weights(layer: nn.Module) -> None:
    from deepspeed import zero

    registered = {id(p) for p in getattr(layer, "_external_params", {}).values()}
    weights = [layer.get_base_layer().weight]
    weights += [module.weight for adapters in (layer.lora_A, layer.lora_B) for module in adapters.values()]
    for weight in weights:
        if id(weight) not in registered:
            zero.register_external_parameter(layer, weight)


def masked_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: layer for name, layer in lora_layers(model).items() if isinstance(layer, MaskedLoraMixin)}


def default_target_modules(model: nn.Module) -> list[str]:
    """Every kind of prunable projection of a decoder block (for Llama: the seven q/k/v/o/gate/up/down projections;
    for GPT-2 the Conv1D c_attn/c_proj/c_fc). A compression method may narrow this (its ``lora_targets``)."""
    return sorted({name.rsplit(".", 1)[-1] for name in prunable_linears(model)})


def check_lora_args(model_args) -> None:
    """Reject LoRA settings mask-exact training cannot honour (checked before any stage runs)."""
    require(not model_args.use_dora, "use_dora must be false: DoRA's magnitude vector is not part of mask-exact LoRA")
    require(model_args.lora_r >= 1, f"lora_r must be >= 1 (got {model_args.lora_r})")
    require(0.0 <= model_args.lora_dropout < 1.0, f"lora_dropout must be in [0, 1) (got {model_args.lora_dropout})")


def lora_config(model_args, model: nn.Module, default_targets: list[str] | None = None):
    """peft ``LoraConfig`` from trl's ``ModelConfig`` fields (``lora_r``, ``lora_alpha``, ...); the targets are
    ``lora_target_modules`` if the recipe sets them, else ``default_targets`` (else every prunable projection).

    ``fan_in_fan_out`` is set when the prunable projections are Conv1D (GPT-2), which store their weight
    transposed: peft would set it per layer anyway, with a warning for every layer."""
    from peft import LoraConfig

    check_lora_args(model_args)
    targets = model_args.lora_target_modules or default_targets or default_target_modules(model)
    transposed = any(is_transposed(module) for module in prunable_linears(model).values())
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        task_type="CAUSAL_LM",
        fan_in_fan_out=transposed,
    )


def masked_lora_model(
    model: nn.Module, masks: MaskSet | None, model_args, default_targets: list[str] | None = None
) -> nn.Module:
    """Wrap a compressed model with peft LoRA; with ``masks`` (a pruned model) every adapter on a pruned Linear
    is made mask-exact; without (a sliced model, say) the adapters are peft's own."""
    from peft import get_peft_model

    require(
        masks is None or masks.violations(model) == 0,
        "finetune: the base model has nonzero weights where the masks prune",
    )
    peft_model = get_peft_model(model, lora_config(model_args, model, default_targets))
    if masks is not None:
        attach_masks(peft_model, masks)
    return peft_model
