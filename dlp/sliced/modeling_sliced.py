"""Decoders whose residual stream has been rotated and sliced (SliceGPT; Dynamic Slicing's per-layer widths).

This file depends on torch and transformers only: it is shipped inside every sliced model that dlp exports, so
``AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)`` loads and runs the model without dlp.

One sliced block serves every supported family (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma). It is built from the
family's own attention and MLP classes, so what differs between families stays theirs: sliding-window attention
(Mistral, Qwen2), q/k/v biases (Qwen2), per-head q/k norms (Qwen3: they act on each head's query and key, after
the projections, where the rotation never reaches), fused qkv and gate/up projections (Phi-3), Gemma's GELU MLP
and scaled embeddings (applied by the family's own model class before block 0). Only the projections that read or
write the residual stream are replaced by narrower ones. For each family the module defines
``Sliced<Family>Config``, ``Sliced<Family>Model`` and ``Sliced<Family>ForCausalLM`` (subclasses of the family's own).

Why the shapes are what they are (D = ``hidden_size``, the original width):

* The norm scales (w, or Gemma's 1 + w) are folded into the Linears that read the normalized stream, so every
  block norm is a plain RMS normalization, which commutes with a rotation. It still divides by D, not by the
  sliced width: a sliced stream keeps almost all of the energy of the full one, so its RMS over D is the
  original RMS.
* Each residual position has its own orthonormal basis (the top principal directions of its calibration
  signal). A block reads its stream in basis Q_in (width ``sliced_attention_dims[l]``), attention writes in basis
  Q_mid (``sliced_mlp_dims[l]``) and the MLP writes in basis Q_out (the next block's input width), so the residual
  connections carry the change of basis: ``attn_shortcut`` = Q_midᵀ·Q_in and ``mlp_shortcut`` = Q_outᵀ·Q_mid.
* The vocabulary matrices keep width D, so tied embeddings stay tied: block 0 projects the embeddings into its
  basis (``input_proj``) and the final norm first maps the stream back to D (``UnslicedFinalNorm.proj``), then
  applies the family's own final norm.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

# model_type -> class-name prefix of the family in transformers
FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi3",
    "gemma": "Gemma",
}
# the projection of each sub-block that writes the residual stream; every other Linear in it reads the stream
OUTPUT_PROJECTIONS = {"self_attn": "o_proj", "mlp": "down_proj"}


class SlicedConfigMixin:
    """What a sliced config adds to its family's: the width of every residual position (``None``: width D)."""

    def widths(self, layer: int) -> tuple[int, int, int]:
        """(input, middle, output) width of block ``layer``."""
        count = self.num_hidden_layers
        attention = self.sliced_attention_dims or [self.hidden_size] * count
        mlp = self.sliced_mlp_dims or [self.hidden_size] * count
        final = self.sliced_final_dim or self.hidden_size
        return attention[layer], mlp[layer], attention[layer + 1] if layer + 1 < count else final


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias)


class UnscaledRMSNorm(nn.Module):
    """RMS normalization without a scale, averaging over the original width ``full_width`` (see module docstring)."""

    def __init__(self, full_width: int, eps: float):
        super().__init__()
        self.full_width = full_width
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden = hidden_states.float()
        variance = hidden.pow(2).sum(-1, keepdim=True) / self.full_width
        return (hidden * torch.rsqrt(variance + self.variance_epsilon)).to(dtype)


class UnslicedFinalNorm(nn.Module):
    """Maps the last block's sliced stream back to width D, then applies the model's own final norm."""

    def __init__(self, config, norm: nn.Module):
        super().__init__()
        self.proj = _linear(config.widths(config.num_hidden_layers - 1)[2], config.hidden_size, False)
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(hidden_states))


def _narrow(module: nn.Module, output: str, d_read: int, d_write: int) -> None:
    """Replace ``module``'s projections by ones that read a ``d_read``-wide stream, and its ``output`` projection by
    one that writes a ``d_write``-wide stream; sizes on the other side and biases stay the family's."""
    for name, child in list(module.named_children()):
        if not isinstance(child, nn.Linear):
            continue
        bias = child.bias is not None
        if name == output:
            setattr(module, name, _linear(child.in_features, d_write, bias))
        else:
            setattr(module, name, _linear(d_read, child.out_features, bias))


class SlicedDecoderLayer(GradientCheckpointingLayer):
    """A pre-norm block on a sliced stream: unscaled norms, the family's attention and MLP with narrowed
    projections, and the basis-changing shortcuts."""

    def __init__(self, config, layer_idx: int, attention_class: type, mlp_class: type):
        super().__init__()
        d_in, d_mid, d_out = config.widths(layer_idx)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        layer_types = getattr(config, "layer_types", None)
        if layer_types:  # read by some families' model classes to pick this layer's (sliding-window) mask
            self.attention_type = layer_types[layer_idx]
        self.input_proj = _linear(hidden, d_in, False) if layer_idx == 0 else None
        self.input_layernorm = UnscaledRMSNorm(hidden, eps)
        self.self_attn = attention_class(config, layer_idx)
        _narrow(self.self_attn, OUTPUT_PROJECTIONS["self_attn"], d_in, d_mid)
        self.attn_shortcut = _linear(d_in, d_mid, False)
        self.post_attention_layernorm = UnscaledRMSNorm(hidden, eps)
        self.mlp = mlp_class(config)
        _narrow(self.mlp, OUTPUT_PROJECTIONS["mlp"], d_mid, d_out)
        self.mlp_shortcut = _linear(d_mid, d_out, False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if cache is None:  # older transformers pass the cache under its old name
            cache = kwargs.pop("past_key_values", None)
        if self.input_proj is not None:
            hidden_states = self.input_proj(hidden_states)
        attention = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )[0]
        hidden_states = self.attn_shortcut(hidden_states) + attention
        return self.mlp_shortcut(hidden_states) + self.mlp(self.post_attention_layernorm(hidden_states))


def _family_classes(model_type: str) -> dict[str, type]:
    """``Sliced<Family>Config``, ``...Model`` and ``...ForCausalLM``, subclassing the family's own classes."""
    prefix = FAMILIES[model_type]
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    configuration = importlib.import_module(f"transformers.models.{model_type}.configuration_{model_type}")
    attention, mlp = getattr(modeling, f"{prefix}Attention"), getattr(modeling, f"{prefix}MLP")

    sliced_type = f"sliced_{model_type}"

    class Config(getattr(configuration, f"{prefix}Config"), SlicedConfigMixin):
        model_type = sliced_type
        sliced_attention_dims: list[int] | None = None  # width of the stream entering block l (its attention side)
        sliced_mlp_dims: list[int] | None = None  # width of the stream between block l's attention and MLP
        sliced_final_dim: int | None = None  # width of the stream leaving the last block

    class Model(getattr(modeling, f"{prefix}Model")):
        config_class = Config
        _no_split_modules = ["SlicedDecoderLayer"]
        _can_record_outputs = {"hidden_states": SlicedDecoderLayer}

        def __init__(self, config):
            super().__init__(config)
            self.layers = nn.ModuleList(
                SlicedDecoderLayer(config, i, attention, mlp) for i in range(config.num_hidden_layers)
            )
            self.norm = UnslicedFinalNorm(config, self.norm)
            self.post_init()

    class ForCausalLM(getattr(modeling, f"{prefix}ForCausalLM")):
        config_class = Config
        _no_split_modules = ["SlicedDecoderLayer"]

        def __init__(self, config):
            super().__init__(config)
            self.model = Model(config)
            self.post_init()

    classes = {"Config": Config, "Model": Model, "ForCausalLM": ForCausalLM}
    for suffix, cls in classes.items():
        cls.__name__ = cls.__qualname__ = f"Sliced{prefix}{suffix}"
        cls.__module__ = __name__
    Config.register_for_auto_class()
    ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    return classes


SLICED_CLASSES: dict[str, dict[str, type]] = {}  # model_type of the dense family -> its sliced classes
for _model_type in FAMILIES:
    try:
        SLICED_CLASSES[_model_type] = _family_classes(_model_type)
    except (ImportError, AttributeError):  # a transformers without this family: its models cannot be sliced here
        continue
    for _suffix, _cls in SLICED_CLASSES[_model_type].items():
        globals()[_cls.__name__] = _cls
