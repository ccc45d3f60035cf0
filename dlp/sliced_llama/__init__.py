"""The sliced Llama architecture. Its one module, ``modeling_sliced_llama.py``, imports only torch and
transformers: dlp copies it into every exported sliced model, which then loads with ``trust_remote_code=True``."""

from .modeling_sliced_llama import (
    SlicedLlamaConfig,
    SlicedLlamaDecoderLayer,
    SlicedLlamaForCausalLM,
    UnscaledRMSNorm,
    UnslicedFinalNorm,
)

SLICING_STRUCTURE = ("input_proj", "attn_shortcut", "mlp_shortcut")  # the Linears that only change basis

__all__ = [
    "SLICING_STRUCTURE",
    "SlicedLlamaConfig",
    "SlicedLlamaDecoderLayer",
    "SlicedLlamaForCausalLM",
    "UnscaledRMSNorm",
    "UnslicedFinalNorm",
]


def _register_auto_classes() -> None:
    """Let dlp load sliced models without ``trust_remote_code`` (its own copy of the code is this module)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(SlicedLlamaConfig.model_type, SlicedLlamaConfig)
        AutoModelForCausalLM.register(SlicedLlamaConfig, SlicedLlamaForCausalLM)
    except ValueError:  # already registered (a module reloaded)
        pass


_register_auto_classes()
