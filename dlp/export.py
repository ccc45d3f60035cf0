"""Export a compressed model as a plain Hugging Face directory, in one atomic step.

Every method's model leaves dlp through here: a pruned model (with its masks beside the weights), a merged one, a
sliced one (whose architecture is registered for the Auto classes, so ``save_pretrained`` writes its modeling file
too), and the 4-bit re-quantized copy of a merged model. The directory holds safetensors, config, tokenizer and the
masks; it loads with ``AutoModelForCausalLM.from_pretrained`` (``trust_remote_code=True`` for a sliced model) and
needs no dlp import.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import require
from .rundir import atomic_dir
from .masks import MaskSet
from .modeling import load_model_and_tokenizer
from .resources import saved_bytes


def export_model(model: nn.Module, tokenizer, masks: MaskSet | None, target: str | Path) -> Path:
    """Write the merged model, its tokenizer and its masks (if any) to ``target`` in one atomic step. A sliced
    model's class is registered for the Auto classes, so ``save_pretrained`` also writes its modeling file."""
    target = Path(target)
    with atomic_dir(target, size=saved_bytes(model)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if masks is not None:
            masks.save(Path(tmp) / "masks.safetensors")
    return target


def export_quantized(model_dir: str | Path, target: str | Path, masks: MaskSet, quantization) -> int:
    """Re-quantize an exported merged model to 4-bit into ``target`` (atomically); returns the pruned weights
    that are not zero after dequantizing it again (0: the 4-bit codes keep every pruned weight at exactly 0)."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir), "float32", "sdpa", quantization_config=quantization)
    violations = masks.violations(model)
    require(violations == 0, f"export_4bit: {violations} pruned weights are not zero after 4-bit quantization")
    export_model(model, tokenizer, masks, target)
    return violations
