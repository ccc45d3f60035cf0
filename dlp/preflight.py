"""Checks that run before any heavy work: the model's structure and limits, read from its config alone.

A run loads the model, measures the dense perplexity and sweeps the calibration data before it prunes; a mistake
that only the model can reveal (an architecture without a decoder stack, a window longer than the learned
position table, an explicit allocation of the wrong length) used to surface only then, minutes in, sometimes as
an ``IndexError`` deep inside the model. Here the config is read and the model is built on the ``meta`` device
(no weights, no memory, well under a second), so those mistakes become one-line errors at once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .distributed import zero3_init_disabled
from .errors import DlpError, require
from .masks import fingerprint_mismatches
from .modeling import find_decoder_layers, prunable_linears, resolve_model_dir
from .projections import logical_shape


@dataclass(frozen=True)
class ModelPlan:
    """What the checks learned about a model without loading its weights."""

    model_id: str
    model_type: str
    num_layers: int
    max_positions: int | None  # config.max_position_embeddings (n_positions for GPT-2), if the config has one
    learned_positions: bool  # a position table (OPT, GPT-2): no token may sit beyond it
    shapes: dict[str, tuple[int, int]]  # every prunable module's logical [out, in] shape
    vocab_size: int = 0  # rows of the output embedding (the next-token distribution's size)
    adaptable: tuple[str, ...] = ()  # every module peft can put a LoRA adapter on (Linear, Conv1D, Embedding)
    tied: tuple[str, ...] = ()  # the input and output embeddings' names, when they share one weight


def _learned_position_table(model: nn.Module, layers: nn.ModuleList) -> bool:
    """Whether the model embeds positions with a learned table: an Embedding other than the token embedding,
    outside the decoder blocks (GPT-2's ``wpe``, OPT's ``embed_positions``). RoPE and ALiBi models have none."""
    tokens = model.get_input_embeddings()
    inside = {id(m) for m in layers.modules()}
    return any(isinstance(m, nn.Embedding) and m is not tokens and id(m) not in inside for m in model.modules())


def inspect_model(model_id: str, trust_remote_code: bool = False) -> ModelPlan:
    """Read ``model_id``'s config and build it on the meta device: its decoder stack, prunable modules and limits.

    Raises a one-line DlpError for a model that cannot be read or has no decoder stack dlp can prune."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import sliced  # noqa: F401  (dlp's sliced architectures, as load_model_and_tokenizer registers them)

    path = resolve_model_dir(model_id)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise DlpError(f"model: cannot read the config of {model_id!r}: {str(exc).splitlines()[0][:200]}")
    try:
        with zero3_init_disabled(), torch.device("meta"):  # ZeRO-3's partitioned init cannot build on meta
            model = AutoModelForCausalLM.from_config(
                config, attn_implementation="eager", trust_remote_code=trust_remote_code
            )
    except (ValueError, KeyError) as exc:
        raise DlpError(
            f"model: {model_id!r} ({config.model_type}) is not a causal LM transformers can build: "
            f"{str(exc).splitlines()[0][:200]}"
        )
    _, layers = find_decoder_layers(model)  # an architecture without a decoder stack fails here, at once
    max_positions = getattr(config, "max_position_embeddings", None)
    return ModelPlan(
        model_id,
        config.model_type,
        len(layers),
        max_positions if isinstance(max_positions, int) else None,
        _learned_position_table(model, layers),
        {name: logical_shape(module) for name, module in prunable_linears(model).items()},
        model.get_output_embeddings().weight.shape[0],
        _adaptable_modules(model),
        _tied_embeddings(model),
    )


def _adaptable_modules(model: nn.Module) -> tuple[str, ...]:
    from transformers.pytorch_utils import Conv1D

    kinds = (nn.Linear, nn.Embedding, Conv1D)
    return tuple(name for name, module in model.named_modules() if isinstance(module, kinds))


def _tied_embeddings(model: nn.Module) -> tuple[str, ...]:
    """The names of the input and output embeddings when they are one tensor (``tie_word_embeddings``)."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or inputs.weight is not outputs.weight:
        return ()
    names = {id(module): name for name, module in model.named_modules()}
    return (names[id(inputs)], names[id(outputs)])


def check_lora_targets(plan: ModelPlan, targets: list[str] | str | None) -> None:
    """``lora_target_modules`` against the model, before any stage runs: every name must match a module peft can
    adapt (peft matches a name or a dotted suffix of one), and neither of two tied embeddings may be adapted: the
    adapter would train one tensor under two names, and the merge could not give the model it trained."""
    if not targets or isinstance(targets, str):  # None: the method's default; a string: peft's "all-linear"
        return
    kinds = sorted({name.rsplit(".", 1)[-1] for name in plan.adaptable})
    for target in targets:
        matched = [name for name in plan.adaptable if name == target or name.endswith(f".{target}")]
        require(
            matched,
            f"lora_target_modules: {target!r} names no Linear or Embedding module of {plan.model_id} "
            f"({plan.model_type}), which has {', '.join(kinds) or 'none'}",
        )
        tied = [name for name in matched if name in plan.tied]
        if tied:
            other = next(name for name in plan.tied if name != tied[0])
            raise DlpError(
                f"lora_target_modules: {target!r} is {tied[0]}, which {plan.model_type} ties to {other} "
                "(tie_word_embeddings): an adapter there cannot be merged exactly; remove it, or untie the embeddings "
                "in the model's config"
            )


def check_lengths(plan: ModelPlan, **lengths: int | None) -> None:
    """Every window length (``seqlen=512, eval_seqlen=...``) must fit a learned position table; beyond a RoPE
    model's trained context it is allowed, with a warning (quality degrades, nothing breaks)."""
    if plan.max_positions is None:
        return
    for name, length in lengths.items():
        if length is None or length <= plan.max_positions:
            continue
        require(
            not plan.learned_positions,
            f"{name} must be <= {plan.max_positions}: {plan.model_type} has learned "
            f"positions for {plan.max_positions} tokens (got {length})",
        )
        warnings.warn(
            f"{name}={length} exceeds the {plan.max_positions} positions {plan.model_type} was trained "
            "with; its quality beyond them is not what the papers measured",
            stacklevel=2,
        )


def check_pattern_fits(plan: ModelPlan, m: int, pattern: str) -> None:
    """An N:M pattern groups M consecutive inputs: every prunable module's input width must be a multiple of M."""
    for name, (_, columns) in plan.shapes.items():
        require(columns % m == 0, f"pattern {pattern}: {name} has {columns} inputs, not a multiple of {m}")


def check_masks_fit(
    plan: ModelPlan,
    metadata: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    field: str,
    model_field: str = "model_name_or_path",
) -> None:
    """Masks reused through ``field`` (their metadata and shapes) must have been made for a model like the one
    ``model_field`` names: same architecture and layer count, a mask of the right shape for every prunable module."""
    for label, made, seen in fingerprint_mismatches(metadata.get("fingerprint"), plan.model_type, plan.num_layers):
        raise DlpError(f"{field}: the masks were made for {label} {made!r}, {model_field} has {seen!r}")
    uncovered = sorted(set(plan.shapes) - set(shapes))
    if uncovered:
        raise DlpError(
            f"{field}: the masks cover {len(plan.shapes) - len(uncovered)} of {model_field}'s "
            f"{len(plan.shapes)} prunable modules ({uncovered[0]} has no mask)"
        )
    for name, shape in plan.shapes.items():
        require(
            tuple(shapes[name]) == shape,
            f"{field}: {name} has shape {shape} in {model_field} but {tuple(shapes[name])} in the masks",
        )


def check_teacher(student: ModelPlan, teacher_id: str) -> ModelPlan:
    """A distillation teacher must predict over the student's vocabulary (the same tokenizer, in practice)."""
    try:
        teacher = inspect_model(teacher_id)
    except DlpError as exc:  # the same checks as for the model, reported under the field that named it
        raise DlpError("teacher: " + str(exc).removeprefix("model: "))
    require(
        teacher.vocab_size == student.vocab_size,
        f"teacher: {teacher_id!r} predicts over {teacher.vocab_size} tokens but the model over "
        f"{student.vocab_size}; distillation needs the same tokenizer",
    )
    return teacher
