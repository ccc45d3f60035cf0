"""A Llama whose residual stream has been rotated and sliced (SliceGPT; Dynamic Slicing's per-layer widths).

This file depends on torch and transformers only: it is shipped inside every sliced model that dlp exports, so
``AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)`` loads and runs the model without dlp.

Why the shapes are what they are (D = ``hidden_size``, the original width):

* The RMSNorm scales are folded into the Linears that read the normalized stream, so every norm is a plain
  RMS normalization, which commutes with a rotation. It still divides by D, not by the sliced width: a sliced
  stream keeps almost all of the energy of the full one, so its RMS over D is the original RMS.
* Each residual position has its own orthonormal basis (the top principal directions of its calibration
  signal). A block reads its stream in basis Q_in (width ``sliced_attention_dims[l]``), attention writes in basis
  Q_mid (``sliced_mlp_dims[l]``) and the MLP writes in basis Q_out (the next block's input width), so the residual
  connections carry the change of basis: ``attn_shortcut`` = Q_midᵀ·Q_in and ``mlp_shortcut`` = Q_outᵀ·Q_mid.
* The vocabulary matrices keep width D, so tied embeddings stay tied: block 0 projects the embeddings into its
  basis (``input_proj``) and the final norm first maps the stream back to D (``UnslicedFinalNorm.proj``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaRMSNorm,
)


class SlicedLlamaConfig(LlamaConfig):
    """A Llama config plus the width of every residual position (``None``: not sliced, width D)."""

    model_type = "sliced_llama"
    sliced_attention_dims: list[int] | None = None  # width of the stream entering block l (its attention side)
    sliced_mlp_dims: list[int] | None = None  # width of the stream between block l's attention and MLP
    sliced_final_dim: int | None = None  # width of the stream leaving the last block

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
    """Maps the last block's sliced stream back to width D, then applies the model's own final RMSNorm."""

    def __init__(self, config: SlicedLlamaConfig):
        super().__init__()
        self.proj = _linear(config.widths(config.num_hidden_layers - 1)[2], config.hidden_size, False)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(hidden_states))


class SlicedLlamaDecoderLayer(GradientCheckpointingLayer):
    """A Llama block on a sliced stream: unscaled norms, rotated/sliced projections, basis-changing shortcuts."""

    def __init__(self, config: SlicedLlamaConfig, layer_idx: int):
        super().__init__()
        d_in, d_mid, d_out = config.widths(layer_idx)
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        self.input_proj = _linear(hidden, d_in, False) if layer_idx == 0 else None
        self.input_layernorm = UnscaledRMSNorm(hidden, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.self_attn.q_proj = _linear(d_in, heads * head_dim, config.attention_bias)
        self.self_attn.k_proj = _linear(d_in, kv_heads * head_dim, config.attention_bias)
        self.self_attn.v_proj = _linear(d_in, kv_heads * head_dim, config.attention_bias)
        self.self_attn.o_proj = _linear(heads * head_dim, d_mid, config.attention_bias)
        self.attn_shortcut = _linear(d_in, d_mid, False)
        self.post_attention_layernorm = UnscaledRMSNorm(hidden, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        self.mlp.gate_proj = _linear(d_mid, config.intermediate_size, config.mlp_bias)
        self.mlp.up_proj = _linear(d_mid, config.intermediate_size, config.mlp_bias)
        self.mlp.down_proj = _linear(config.intermediate_size, d_out, config.mlp_bias)
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
        if cache is None:  # transformers < 5.40 may still pass the cache under its old name
            cache = kwargs.pop("past_key_values", None)
        if self.input_proj is not None:
            hidden_states = self.input_proj(hidden_states)
        attention, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = self.attn_shortcut(hidden_states) + attention
        return self.mlp_shortcut(hidden_states) + self.mlp(self.post_attention_layernorm(hidden_states))


class SlicedLlamaModel(LlamaModel):
    config_class = SlicedLlamaConfig
    _no_split_modules = ["SlicedLlamaDecoderLayer"]
    _can_record_outputs = {"hidden_states": SlicedLlamaDecoderLayer}

    def __init__(self, config: SlicedLlamaConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(SlicedLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = UnslicedFinalNorm(config)
        self.post_init()


class SlicedLlamaForCausalLM(LlamaForCausalLM):
    config_class = SlicedLlamaConfig
    _no_split_modules = ["SlicedLlamaDecoderLayer"]

    def __init__(self, config: SlicedLlamaConfig):
        super().__init__(config)
        self.model = SlicedLlamaModel(config)
        self.post_init()


SlicedLlamaConfig.register_for_auto_class()
SlicedLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
