"""Rotate-and-slice (SliceGPT, Ashkboos et al. 2024) with per-layer widths (Dynamic Slicing, EMNLP Findings 2024).

A pre-norm block computes with its residual stream only through RMSNorm (whose scale is folded into the
Linears that read it) and Linears, so rotating the stream by any orthonormal Q and every weight that touches it
by Q changes nothing. Choosing Q as the principal directions of the stream's calibration signal puts its energy
into the first columns; dropping the last ones (slicing) removes whole rows/columns of every weight matrix.

The slicing is one visitor of the sweep engine (:mod:`dlp.sweep`) and runs in the SliceGPT order: each block is
rotated and sliced on the outputs of the blocks already sliced before it. Every position of the stream gets its
own basis, computed in the *original* coordinates, which is how the visitor keeps the bookkeeping simple:

1. block l reads its input in the current basis (D × d_in, from the previous block);
2. its attention is run with the output side still unrotated, the middle signal is collected (D wide), its top
   ``d_mid`` principal directions become Q_mid, and attention's output side is rotated and sliced to them;
3. the block is run again with the MLP output unrotated; the top ``d_out`` directions of its output are Q_out,
   the MLP output side is rotated and sliced, and the outputs, rotated by Q_out, feed block l+1.

The per-layer fractions are uniform (SliceGPT) or from Layer Redundancy (``lr``): a block whose output is closer
to its input (mean cosine over tokens) is sliced more, spread ±``spread`` around the mean fraction.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from torch import nn

from .allocate import balance, lr_sparsities
from .errors import ResultCheckFailed, require
from .modeling import find_decoder_layers
from .sliced_llama import SlicedLlamaConfig, SlicedLlamaForCausalLM
from .sweep import LayerContext, sweep

SLICEABLE_MODEL_TYPES = ("llama",)
_BLOCK_PARTS = (
    "input_layernorm",
    "post_attention_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def check_sliceable_type(model_type: str | None) -> None:
    require(
        model_type in SLICEABLE_MODEL_TYPES,
        f"slicing supports model_type {', '.join(SLICEABLE_MODEL_TYPES)} "
        f"(Llama-architecture models such as SmolLM2, Llama 2/3); got {model_type!r}",
    )


def check_sliceable(model: nn.Module) -> None:
    """Slicing rewrites a block's structure, so only architectures whose blocks are known are accepted."""
    check_sliceable_type(getattr(model.config, "model_type", None))
    _, layers = find_decoder_layers(model)
    for part in _BLOCK_PARTS:
        require(layers[0].get_submodule(part) is not None, f"slicing: decoder block lacks {part}")


def slicing_fractions(
    allocation: str,
    mean_fraction: float,
    num_layers: int,
    redundancy: Sequence[float] | None = None,
    spread: float = 0.0,
    max_fraction: float = 0.9,
) -> list[float]:
    """Per-layer slicing fractions averaging ``mean_fraction``: uniform, or spread by Layer Redundancy."""
    if allocation == "uniform":
        return [mean_fraction] * num_layers
    require(
        redundancy is not None and len(redundancy) == num_layers,
        "slicing_allocation lr needs one redundancy score per layer",
    )
    return balance(lr_sparsities(redundancy, mean_fraction, spread), [1] * num_layers, mean_fraction, max_fraction)


def sliced_widths(fractions: Sequence[float], full_width: int, multiple: int = 8) -> list[int]:
    """Widths (1 − f_l)·D in multiples of ``multiple`` whose sum is the multiple-rounded Σ(1 − f_l)·D.

    Rounding each layer on its own would shift the mean fraction (30% of 576 rounds every layer to 400, i.e.
    30.6%); distributing the remainders (largest first, ties to the earlier layer) keeps the mean on target, so
    a uniform and a dynamic run of the same mean slice the same number of dimensions.
    """
    require(multiple >= 1, f"slicing_multiple must be >= 1 (got {multiple})")
    units = [(1.0 - f) * full_width / multiple for f in fractions]
    widths = [math.floor(u) for u in units]
    order = sorted(range(len(units)), key=lambda i: units[i] - widths[i], reverse=True)
    for index in order[: round(sum(units)) - sum(widths)]:
        widths[index] += 1
    return [min(full_width, max(1, w) * multiple) for w in widths]


def check_slicing_mean(widths: Sequence[int], full_width: int, target: float, multiple: int) -> float:
    """The mean fraction ``widths`` slice, which must be ``target`` to within one ``multiple`` over all layers
    (what rounding to multiples allows): the clamps of :func:`sliced_widths` (every layer keeps at least one
    multiple) can push it further, and then the run stops before slicing instead of reporting another figure."""
    measured = 1.0 - sum(widths) / (full_width * len(widths))
    tolerance = max(0.001, multiple / (full_width * len(widths)))
    if abs(measured - target) > tolerance:
        raise ResultCheckFailed(
            f"slice: widths {list(widths)} slice {100 * measured:.2f}% of the width on average, "
            f"but slicing asks {100 * target:.2f}% (a width cannot go below slicing_multiple="
            f"{multiple}); nothing was sliced"
        )
    return measured


def sliced_config(config, widths: Sequence[int]) -> SlicedLlamaConfig:
    """The sliced model's config: the dense one plus the width of every residual position."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    sliced = SlicedLlamaConfig(
        **fields, sliced_attention_dims=list(widths), sliced_mlp_dims=list(widths), sliced_final_dim=widths[-1]
    )
    sliced._attn_implementation = config._attn_implementation
    return sliced


def _gram(hidden: torch.Tensor, device: torch.device, chunk: int = 8192) -> torch.Tensor:
    """Σ xᵀx over every token (float64, on the compute ``device``, fed chunk by chunk from wherever the hidden
    states are kept): the uncentred covariance SliceGPT takes principal directions of."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    gram = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=device)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk].to(device).double()
        gram += part.T @ part
    return gram


def principal_basis(gram: torch.Tensor, width: int) -> torch.Tensor:
    """The ``width`` eigenvectors of a Gram matrix with the largest eigenvalues, as columns (D × width)."""
    values, vectors = torch.linalg.eigh(gram.double())
    return vectors[:, torch.argsort(values, descending=True)[:width]]


@torch.no_grad()
def _assign(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    linear.weight.data = weight.to(linear.weight.device, linear.weight.dtype).contiguous()
    if bias is not None:
        linear.bias.data = bias.to(linear.bias.device, linear.bias.dtype).contiguous()


def _projection(basis: torch.Tensor, like: nn.Linear) -> nn.Linear:
    """A Linear mapping a stream held in ``basis`` back to the original coordinates (x ↦ x·basisᵀ)."""
    linear = nn.Linear(basis.shape[1], basis.shape[0], bias=False, device=like.weight.device, dtype=like.weight.dtype)
    _assign(linear, basis)
    return linear


class _Zero(nn.Module):
    """Stands in for the MLP while the middle signal is collected: the block then outputs its middle stream."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(())


@contextmanager
def _swapped(module: nn.Module, **parts: nn.Module) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in parts}
    try:
        for name, part in parts.items():
            setattr(module, name, part)
        yield
    finally:
        for name, part in saved.items():
            setattr(module, name, part)


def _fold(linear: nn.Linear, scale: torch.Tensor) -> torch.Tensor:
    """W·diag(scale): a Linear's weight with the preceding RMSNorm's scale folded into its input columns."""
    return linear.weight.double() * scale.double().unsqueeze(0)


def _bias(linear: nn.Linear, basis: torch.Tensor | None = None) -> torch.Tensor | None:
    if linear.bias is None:
        return None
    return linear.bias.double() @ basis if basis is not None else linear.bias


@dataclass
class _Stream:
    """Where the residual stream stands between blocks: the directions (D × width) its coordinates refer to."""

    basis: torch.Tensor | None = None


def _slicing_visitor(targets: nn.ModuleList, config: SlicedLlamaConfig, stream: _Stream):
    def visit(ctx: LayerContext) -> torch.Tensor:
        dense, target = ctx.layer, targets[ctx.index]
        d_in, d_mid, d_out = config.widths(ctx.index)
        home = next(target.parameters()).device
        target.to(ctx.device)
        if ctx.index == 0:  # the embeddings' basis: block 0 projects into it
            stream.basis = principal_basis(_gram(ctx.inputs, ctx.device), d_in)
            _assign(target.input_proj, stream.basis.T)
        basis, attn, mlp = stream.basis, dense.self_attn, dense.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            source = getattr(attn, name)
            _assign(getattr(target.self_attn, name), _fold(source, dense.input_layernorm.weight) @ basis, _bias(source))
        run = replace(ctx, layer=target).forward
        with (
            _swapped(target, attn_shortcut=_projection(basis, attn.o_proj), mlp=_Zero(), mlp_shortcut=nn.Identity()),
            _swapped(target.self_attn, o_proj=attn.o_proj),
        ):
            q_mid = principal_basis(_gram(run(), ctx.device), d_mid)
        _assign(target.self_attn.o_proj, q_mid.T @ attn.o_proj.weight.double(), _bias(attn.o_proj, q_mid))
        _assign(target.attn_shortcut, q_mid.T @ basis)
        for name in ("gate_proj", "up_proj"):
            source = getattr(mlp, name)
            _assign(
                getattr(target.mlp, name), _fold(source, dense.post_attention_layernorm.weight) @ q_mid, _bias(source)
            )
        with (
            _swapped(target, mlp_shortcut=_projection(q_mid, mlp.down_proj)),
            _swapped(target.mlp, down_proj=mlp.down_proj),
        ):
            outputs = run()
        q_out = principal_basis(_gram(outputs, ctx.device), d_out)
        _assign(target.mlp.down_proj, q_out.T @ mlp.down_proj.weight.double(), _bias(mlp.down_proj, q_out))
        _assign(target.mlp_shortcut, q_out.T @ q_mid)
        stream.basis = q_out
        target.to(home)
        return _rotate(outputs, q_out)

    return visit


def _rotate(hidden: torch.Tensor, basis: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """hidden·basis (the outputs in the next block's sliced coordinates), a few samples at a time."""
    rotated = hidden.new_empty((*hidden.shape[:-1], basis.shape[1]))
    for start in range(0, hidden.shape[0], chunk):
        part = hidden[start : start + chunk]
        rotated[start : start + chunk] = (part.to(basis.device).double() @ basis).to(hidden.dtype).to(hidden.device)
    return rotated


@torch.no_grad()
def slice_model(
    model: nn.Module,
    input_ids: torch.Tensor,
    widths: Sequence[int],
    *,
    device="cpu",
    batch_size: int = 8,
    memory: str = "auto",
) -> SlicedLlamaForCausalLM:
    """A :class:`SlicedLlamaForCausalLM` with block l's stream ``widths[l]`` wide, built from the dense ``model``
    (left unchanged) and calibration windows ``input_ids``."""
    check_sliceable(model)
    _, layers = find_decoder_layers(model)
    require(len(widths) == len(layers), f"slicing: {len(widths)} widths for {len(layers)} layers")
    require(
        all(1 <= w <= model.config.hidden_size for w in widths),
        f"slicing: widths must be in [1, {model.config.hidden_size}] (got {list(widths)})",
    )
    config = sliced_config(model.config, widths)
    dtype = model.get_input_embeddings().weight.dtype
    sliced = SlicedLlamaForCausalLM(config).to(dtype)
    sliced.get_input_embeddings().weight.data.copy_(model.get_input_embeddings().weight)
    if not config.tie_word_embeddings:
        sliced.get_output_embeddings().weight.data.copy_(model.get_output_embeddings().weight)
    sliced.model.norm.norm.weight.data.copy_(model.model.norm.weight)
    stream = _Stream()
    sweep(
        model,
        input_ids,
        _slicing_visitor(sliced.model.layers, config, stream),
        device=device,
        batch_size=batch_size,
        desc="slicing",
        memory=memory,
    )
    _assign(sliced.model.norm.proj, stream.basis)
    return sliced.eval()


def parameter_count(model: nn.Module, embeddings: bool = True) -> int:
    """Distinct parameters (tied matrices once); ``embeddings=False`` leaves out the vocabulary matrices."""
    vocab = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if embeddings or id(p) not in vocab)
