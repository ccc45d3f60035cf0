"""The sliced architectures. Their one module, ``modeling_sliced.py``, imports only torch and transformers: dlp
copies it into every exported sliced model, which then loads with ``trust_remote_code=True``."""

from .modeling_sliced import (
    FAMILIES,
    OUTPUT_PROJECTIONS,
    SLICED_CLASSES,
    SlicedDecoderLayer,
    UnscaledRMSNorm,
    UnslicedFinalNorm,
)

SLICING_STRUCTURE = ("input_proj", "attn_shortcut", "mlp_shortcut")  # the Linears that only change basis

__all__ = [
    "FAMILIES",
    "OUTPUT_PROJECTIONS",
    "SLICED_CLASSES",
    "SLICING_STRUCTURE",
    "SlicedDecoderLayer",
    "UnscaledRMSNorm",
    "UnslicedFinalNorm",
    "sliced_classes",
]


def sliced_classes(model_type: str) -> dict[str, type]:
    """The sliced ``Config``, ``Model`` and ``ForCausalLM`` classes of a dense family's ``model_type``."""
    return SLICED_CLASSES[model_type]


def _register_auto_classes() -> None:
    """Let dlp load sliced models without ``trust_remote_code`` (its own copy of the code is this package)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for classes in SLICED_CLASSES.values():
        try:
            AutoConfig.register(classes["Config"].model_type, classes["Config"])
            AutoModelForCausalLM.register(classes["Config"], classes["ForCausalLM"])
        except ValueError:  # already registered (a module reloaded)
            pass


_register_auto_classes()
