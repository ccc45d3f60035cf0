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

from .allocate import LR_MAPPINGS, balance
from .errors import DlpError, ResultCheckFailed, require
from .modeling import find_decoder_layers
from .sliced import OUTPUT_PROJECTIONS, SLICED_CLASSES, sliced_classes
from .sweep import LayerContext, sweep

SLICEABLE_MODEL_TYPES = tuple(SLICED_CLASSES)
_LAYER_NORM = (
    "its blocks use LayerNorm (mean subtraction and a bias), which does not commute with a rotation of the "
    "stream; converting it to RMSNorm first (SliceGPT's LayerNorm fusion) is not implemented"
)
_SANDWICH_NORMS = (
    "its blocks normalize and scale the attention and MLP outputs (post_attention_layernorm, "
    "post_feedforward_layernorm) in the original coordinates before the residual add; such norms do not commute "
    "with a rotation of the stream, and keeping them exact would need an extra D×d projection per norm, undoing "
    "most of the compression"
)
REFUSALS = {  # model_type -> why its blocks cannot be rotated and sliced exactly
    "gemma2": _SANDWICH_NORMS,
    "gemma3": _SANDWICH_NORMS,
    "gemma3_text": _SANDWICH_NORMS,
    "opt": _LAYER_NORM,
    "gpt2": _LAYER_NORM,
    "gpt_neox": _LAYER_NORM + "; its attention and MLP also read the stream in parallel",
    "phi": _LAYER_NORM + "; its attention and MLP also read the stream in parallel",
    "falcon": _LAYER_NORM,
    "bloom": _LAYER_NORM,
}
_BLOCK_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_DROPOUTS = {"resid_attn_dropout", "resid_mlp_dropout"}  # Phi-3's, on the sub-block outputs; off at inference


def check_sliceable_type(model_type: str | None) -> None:
    """From the config alone: a family with a sliced architecture, or a one-line refusal that says why not."""
    if model_type in REFUSALS:
        raise DlpError(f"slicing: model_type {model_type!r} cannot be sliced exactly: {REFUSALS[model_type]}")
    require(
        model_type in SLICEABLE_MODEL_TYPES,
        f"slicing supports model_type {', '.join(SLICEABLE_MODEL_TYPES)}; got {model_type!r}",
    )


def check_sliceable(model: nn.Module) -> None:
    """Slicing rewrites a block's structure, so only pre-norm blocks of known families are accepted: an RMS
    norm with a per-channel scale before the attention and before the MLP, and nothing else on the stream."""
    check_sliceable_type(getattr(model.config, "model_type", None))
    _, layers = find_decoder_layers(model)
    block = layers[0]
    children = {name for name, _ in block.named_children()}
    require(
        _BLOCK_CHILDREN <= children and not children - _BLOCK_CHILDREN - _DROPOUTS,
        f"slicing: a decoder block must hold {', '.join(sorted(_BLOCK_CHILDREN))} and nothing else on the "
        f"residual stream (got {', '.join(sorted(children))})",
    )
    for part, output in OUTPUT_PROJECTIONS.items():
        require(
            isinstance(getattr(block.get_submodule(part), output, None), nn.Linear),
            f"slicing: {part} lacks its output projection {output}",
        )
    for norm in ("input_layernorm", "post_attention_layernorm"):
        norm_scale(block.get_submodule(norm), norm)


@torch.no_grad()
def norm_scale(norm: nn.Module, name: str = "norm") -> torch.Tensor:
    """The per-channel scale s of an RMS norm, x ↦ x / rms(x) · s, found by what reproduces the module: its weight
    w (Llama and most families) or 1 + w (Gemma). Anything else is refused: folding it would not be exact."""
    weight = getattr(norm, "weight", None)
    require(weight is not None and weight.dim() == 1, f"slicing: {name} has no per-channel scale")
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    probe = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight)
    output = norm(probe).double()
    normalized = probe.double() * torch.rsqrt(probe.double().pow(2).mean(-1, keepdim=True) + eps)
    for scale in (weight, 1.0 + weight):
        if torch.allclose(output, normalized * scale.double(), rtol=1e-3, atol=1e-5):
            return scale
    raise DlpError(f"slicing: {name} is not an RMS norm with a per-channel scale (w or 1 + w); it cannot be folded")


def slicing_fractions(
    allocation: str,
    mean_fraction: float,
    num_layers: int,
    redundancy: Sequence[float] | None = None,
    spread: float = 0.0,
    max_fraction: float = 0.9,
    mapping: str = "minmax",
) -> list[float]:
    """Per-layer slicing fractions averaging ``mean_fraction``: uniform, or spread by Layer Redundancy through one
    of :data:`dlp.allocate.LR_MAPPINGS` (``minmax``, ``rank``, ``ratio``), clipped to [0, ``max_fraction``]."""
    if allocation == "uniform":
        return [mean_fraction] * num_layers
    require(
        redundancy is not None and len(redundancy) == num_layers,
        "slicing_allocation lr needs one redundancy score per layer",
    )
    require(mapping in LR_MAPPINGS, f"slicing_lr_mapping must be one of {', '.join(LR_MAPPINGS)} (got {mapping!r})")
    fractions = LR_MAPPINGS[mapping](redundancy, mean_fraction, spread)
    return balance(fractions, [1] * num_layers, mean_fraction, max_fraction)


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


def sliced_config(config, widths: Sequence[int]):
    """The sliced model's config: the dense one (of any sliceable family) plus the width of every residual
    position."""
    fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    sliced = sliced_classes(config.model_type)["Config"](
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


def _reading(module: nn.Module, part: str) -> list[str]:
    """The Linears of a sub-block that read the residual stream: all but its output projection (q/k/v or Phi-3's
    fused qkv_proj; gate/up or gate_up_proj)."""
    return [n for n, c in module.named_children() if isinstance(c, nn.Linear) and n != OUTPUT_PROJECTIONS[part]]


@torch.no_grad()
def _set_reading(source: nn.Module, target: nn.Module, part: str, scale: torch.Tensor, basis: torch.Tensor) -> None:
    """Fold the norm's scale into the sub-block's reading projections and express them in the stream's ``basis``;
    copy what the rotation does not touch (Qwen3's per-head q/k norms act after the projections) unchanged."""
    for name in _reading(source, part):
        linear = getattr(source, name)
        _assign(getattr(target, name), _fold(linear, scale) @ basis, _bias(linear))
    projections = {n for n, c in source.named_children() if isinstance(c, nn.Linear)}
    for name, param in source.named_parameters():
        if name.split(".", 1)[0] not in projections:
            target.get_parameter(name).data.copy_(param.data)


def _set_writing(source: nn.Linear, target: nn.Linear, basis: torch.Tensor) -> None:
    """The sub-block's output projection, writing into the stream's new ``basis``."""
    _assign(target, basis.T @ source.weight.double(), _bias(source, basis))


@dataclass
class _Stream:
    """Where the residual stream stands between blocks: the directions (D × width) its coordinates refer to."""

    basis: torch.Tensor | None = None


def _slicing_visitor(targets: nn.ModuleList, config, stream: _Stream):
    def visit(ctx: LayerContext) -> torch.Tensor:
        dense, target = ctx.layer, targets[ctx.index]
        d_in, d_mid, d_out = config.widths(ctx.index)
        home = next(target.parameters()).device
        target.to(ctx.device)
        if ctx.index == 0:  # the embeddings' basis: block 0 projects into it
            stream.basis = principal_basis(_gram(ctx.inputs, ctx.device), d_in)
            _assign(target.input_proj, stream.basis.T)
        basis, attn, mlp = stream.basis, dense.self_attn, dense.mlp
        o_proj, down_proj = getattr(attn, OUTPUT_PROJECTIONS["self_attn"]), getattr(mlp, OUTPUT_PROJECTIONS["mlp"])
        _set_reading(attn, target.self_attn, "self_attn", norm_scale(dense.input_layernorm), basis)
        run = replace(ctx, layer=target).forward
        with (  # attention's output unrotated and no MLP: the block outputs its middle stream, D wide
            _swapped(target, attn_shortcut=_projection(basis, o_proj), mlp=_Zero(), mlp_shortcut=nn.Identity()),
            _swapped(target.self_attn, **{OUTPUT_PROJECTIONS["self_attn"]: o_proj}),
        ):
            q_mid = principal_basis(_gram(run(), ctx.device), d_mid)
        _set_writing(o_proj, getattr(target.self_attn, OUTPUT_PROJECTIONS["self_attn"]), q_mid)
        _assign(target.attn_shortcut, q_mid.T @ basis)
        _set_reading(mlp, target.mlp, "mlp", norm_scale(dense.post_attention_layernorm), q_mid)
        with (  # the MLP's output unrotated: the block outputs its stream in the original coordinates
            _swapped(target, mlp_shortcut=_projection(q_mid, down_proj)),
            _swapped(target.mlp, **{OUTPUT_PROJECTIONS["mlp"]: down_proj}),
        ):
            outputs = run()
        q_out = principal_basis(_gram(outputs, ctx.device), d_out)
        _set_writing(down_proj, getattr(target.mlp, OUTPUT_PROJECTIONS["mlp"]), q_out)
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
) -> nn.Module:
    """The family's sliced model (``Sliced<Family>ForCausalLM``) with block l's stream ``widths[l]`` wide, built
    from the dense ``model`` (left unchanged) and calibration windows ``input_ids``."""
    check_sliceable(model)
    _, layers = find_decoder_layers(model)
    require(len(widths) == len(layers), f"slicing: {len(widths)} widths for {len(layers)} layers")
    require(
        all(1 <= w <= model.config.hidden_size for w in widths),
        f"slicing: widths must be in [1, {model.config.hidden_size}] (got {list(widths)})",
    )
    config = sliced_config(model.config, widths)
    dtype = model.get_input_embeddings().weight.dtype
    sliced = sliced_classes(model.config.model_type)["ForCausalLM"](config).to(dtype)
    sliced.get_input_embeddings().weight.data.copy_(model.get_input_embeddings().weight)
    if not config.tie_word_embeddings:
        sliced.get_output_embeddings().weight.data.copy_(model.get_output_embeddings().weight)
    sliced.model.norm.norm.load_state_dict(model.model.norm.state_dict())  # the family's own final norm
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
