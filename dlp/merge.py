"""Merge a mask-exact LoRA adapter into its pruned base (the export that follows: :mod:`dlp.export`).

The merge is peft's own ``merge_and_unload`` on layers made mask-exact by :func:`dlp.lora.attach_masks`, so
``W' = W + s·(B·A) ⊙ M``: the exact weight the adapter model computed with. Two checks guard the result: every
masked weight must be exactly zero, and (optionally) the merged model's logits must match the adapter model's
on probe windows.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import DlpError, require
from .rundir import read_json
from .lora import attach_masks
from .masks import MaskSet, model_fingerprint
from .modeling import load_model_and_tokenizer, prunable_linears
from .projections import is_transposed

MERGE_TOLERANCE = 1e-4  # fp32 max |logit difference|; the merge is exact by construction, so this is a guard


@dataclass(frozen=True)
class MergeCheck:
    violations: int  # masked weights that are not exactly zero after the merge
    max_logit_diff: float | None  # adapter model vs merged model on the probe windows (None: not probed)
    lora_layers: int  # mask-exact LoRA layers merged

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _logits(model: nn.Module, probe_ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=probe_ids.to(device), use_cache=False).logits.float().cpu()


def merge_masked(
    peft_model: nn.Module,
    masks: MaskSet | None,
    probe_ids: torch.Tensor | None = None,
    tolerance: Callable[[torch.Tensor], float] = lambda _logits: MERGE_TOLERANCE,
) -> tuple[nn.Module, MergeCheck]:
    """Merge a peft model whose LoRA layers are mask-exact (or, without masks, plain); return the plain merged
    model and its checks. ``tolerance(adapter_logits)``: how far the merged logits may be from the adapter model's
    on the probe (the compression method's ``merge_tolerance``; exact merges keep the default)."""
    from peft.tuners.lora import LoraLayer

    if masks is not None:
        layers = attach_masks(peft_model, masks)  # idempotent for layers that are mask-exact already
    else:
        layers = sum(isinstance(module, LoraLayer) for module in peft_model.modules())
    peft_model.eval()
    before = _logits(peft_model, probe_ids) if probe_ids is not None else None
    merged = peft_model.merge_and_unload()
    diff = float((_logits(merged, probe_ids) - before).abs().max()) if before is not None else None
    check = MergeCheck(masks.violations(merged) if masks is not None else 0, diff, layers)
    require(
        check.violations == 0, f"merge: {check.violations} pruned weights are not zero after merging"
    )  # pragma: no cover
    if diff is not None:
        limit = tolerance(before)
        require(diff <= limit, f"merge: merged logits differ from the adapter model's by {diff:.3g} (> {limit:.3g})")
    return merged, check


QUANTIZATION_FILE = "quantization.json"  # in an adapter directory: the 4-bit config its base was trained in
# In an adapter directory: what the adapter was trained on (the masks' digest, the base's fingerprint), so a merge
# into other masks or another model is refused instead of silently exporting a model no one trained.
BINDING_FILE = "dlp_adapter.json"


def adapter_binding(base: nn.Module, masks: MaskSet | None) -> dict:
    """What an adapter trained on ``base`` (before peft wraps it) with ``masks`` is bound to."""
    return {"masks_digest": masks.digest() if masks is not None else None, "base_fingerprint": model_fingerprint(base)}


def check_adapter_binding(
    adapter_dir: Path, masks: MaskSet | None, base: nn.Module | None = None, force: bool = False
) -> None:
    """Refuse (one line; with ``force`` a warning) an adapter trained on other masks or another kind of model than
    the ones it is about to be merged with. Called twice: before the base loads (``base`` None: the masks' digest,
    so a mismatch costs no load) and after (the base's fingerprint). An adapter without :data:`BINDING_FILE` (from
    a dlp before it, or not dlp's) cannot be checked, and says so once."""
    recorded = read_json(adapter_dir / BINDING_FILE)
    if recorded is None:
        if base is None:
            print(f"[dlp] {adapter_dir} records no masks digest ({BINDING_FILE}): it is merged unchecked")
        return
    if base is None:
        made, given = recorded.get("masks_digest"), masks.digest() if masks is not None else None
        problem = f"it was trained on masks {_short(made)}…, the masks given are {_short(given)}…"
    else:
        made, given = recorded.get("base_fingerprint") or {}, model_fingerprint(base)
        problem = (
            f"it was trained on a {made.get('model_type')} base of {made.get('num_layers')} layers with other "
            f"projections than this {given['model_type']} base of {given['num_layers']} layers"
        )
    if made == given:
        return
    message = f"adapter_dir: {adapter_dir} does not belong to this base and masks: {problem}"
    if not force:
        raise DlpError(f"{message} (--force merges it anyway)")
    warnings.warn(f"{message}; merging it anyway because of --force", stacklevel=2)


def _short(digest: str | None) -> str:
    return str(digest)[:12] if digest else "none"


def load_base(base_dir: str | Path, dtype: str = "float32", merge_base: str = "full", quantization: dict | None = None):
    """(pruned base, tokenizer) to merge into.

    ``full``: the full-precision pruned weights. ``dequantized``: the same weights quantized with the 4-bit
    config the adapter was trained on and dequantized again, i.e. exactly the base the adapter saw in training.
    """
    config = None
    if merge_base == "dequantized":
        require(
            quantization is not None,
            "merge_base: dequantized needs an adapter trained on a 4-bit base "
            f"(its directory holds {QUANTIZATION_FILE}); use merge_base full",
        )
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig.from_dict(dict(quantization))
    base, tokenizer = load_model_and_tokenizer(str(base_dir), dtype, "sdpa", quantization_config=config)
    if config is not None:
        base = dequantize_model(base)  # bit-identical to the dequantization the masked layers did in training
    return base, tokenizer


def dequantize_model(model: nn.Module) -> nn.Module:
    """``model.dequantize()`` with every layer that was a ``Conv1D`` (GPT-2) before quantization a ``Conv1D`` again.

    A 4-bit load turns a Conv1D into a ``Linear4bit`` (remembering it in ``source_cls``), and transformers'
    dequantization turns that into an ``nn.Linear`` [out, in]: exported so, GPT-2 would not load back as itself."""
    from transformers.pytorch_utils import Conv1D

    was_conv1d = [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "source_cls", None), type) and issubclass(module.source_cls, Conv1D)
    ]
    model = model.dequantize()
    for name in was_conv1d:
        model.set_submodule(name, _as_conv1d(model.get_submodule(name)))
    return model


def _as_conv1d(linear: nn.Linear) -> nn.Module:
    """A ``Conv1D`` computing what ``linear`` computes: the same values, the weight stored transposed."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        conv = Conv1D(linear.out_features, linear.in_features)
    weight = linear.weight.detach()
    conv.weight = nn.Parameter(weight.t().contiguous(), requires_grad=linear.weight.requires_grad)
    bias = linear.bias.detach() if linear.bias is not None else weight.new_zeros(linear.out_features)
    conv.bias = nn.Parameter(bias, requires_grad=linear.weight.requires_grad)
    return conv


def load_adapter_model(
    base_dir: str | Path,
    adapter_dir: str | Path,
    masks: MaskSet | None,
    dtype: str = "float32",
    merge_base: str = "full",
    force: bool = False,
):
    """(peft model with mask-exact LoRA layers, tokenizer) from a pruned base directory and an adapter directory;
    an adapter trained on other masks or another model is refused (:func:`check_adapter_binding`).

    The adapter's ``fan_in_fan_out`` is set from the base it is loaded onto: an adapter trained on a 4-bit GPT-2
    (``Linear4bit``, [out, in]) merges into its full-precision ``Conv1D`` base ([in, out]). The LoRA factors are
    the same either way (A is [r, in], B is [out, r]); only the merge's orientation differs."""
    from peft import PeftConfig, PeftModel

    adapter_dir = Path(adapter_dir)
    require((adapter_dir / "adapter_config.json").is_file(), f"adapter_dir: no adapter_config.json in {adapter_dir}")
    check_adapter_binding(adapter_dir, masks, force=force)  # before the base loads: the masks are known
    base, tokenizer = load_base(base_dir, dtype, merge_base, read_json(adapter_dir / QUANTIZATION_FILE))
    require(
        masks is None or masks.violations(base) == 0,
        f"base: {base_dir} has nonzero weights where the masks "
        "prune; is it the pruned model these masks were made for?",
    )
    check_adapter_binding(adapter_dir, masks, base, force)
    config = PeftConfig.from_pretrained(str(adapter_dir))
    if hasattr(config, "fan_in_fan_out"):
        config.fan_in_fan_out = any(is_transposed(module) for module in prunable_linears(base).values())
    model = PeftModel.from_pretrained(base, str(adapter_dir), config=config)
    if masks is not None:
        attach_masks(model, masks)
    return model, tokenizer
