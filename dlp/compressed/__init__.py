"""Compressed checkpoints as they are read: the files shipped inside every compressed export, and dlp's loader.

:mod:`.modeling_compressed` (the format, :class:`~.modeling_compressed.SparseLinear`, the remote-code loader) and
:mod:`.sparse_kernel` (the compiled CPU kernel) import torch, numpy, safetensors and transformers only; dlp writes
them into every compressed export (:mod:`dlp.compress`), so the model loads without dlp.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..errors import require
from .modeling_compressed import MODEL_TYPE, DlpCompressedConfig, DlpCompressedForCausalLM, SparseLinear

__all__ = ["SparseLinear", "is_compressed_checkpoint", "load_compressed"]


def is_compressed_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a compressed export (its config's model type)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def load_compressed(path: str | Path, mode: str = "sparse", **kwargs) -> nn.Module:
    """dlp's loader of a compressed export, the export's own remote loader: ``sparse`` keeps the pruned projections
    compressed (:class:`SparseLinear`, decoding on the compiled kernel), ``dense`` decompresses them into the
    architecture's own model (bitwise the dense export when the values are stored in the model's dtype)."""
    require(mode in ("sparse", "dense"), f"compressed_mode must be sparse or dense (got {mode!r})")
    require(is_compressed_checkpoint(path), f"model: {path} is not a dlp compressed export (no dlp_compressed config)")
    config = DlpCompressedConfig.from_pretrained(str(path))
    return DlpCompressedForCausalLM.from_pretrained(str(path), config=config, compressed_mode=mode, **kwargs)
