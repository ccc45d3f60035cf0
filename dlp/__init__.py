"""dlp: Dynamic Layerwise Pruning with fixed masks for Hugging Face causal LMs."""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"


class _DropUnusedKernelNotice(_logging.Filter):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward" at import on every AVX512-BF16 CPU without the
    optional ``kernels`` package: that kernel serves only 4-bit weights repacked for the CPU, a layout dlp keeps
    bitsandbytes out of (see :func:`dlp.quantize.keep_canonical_4bit_layout`), so the notice is noise here."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "gemm_4bit_forward" not in record.getMessage()


class _DropOfflineKernelTrustNotice(_logging.Filter):
    """The same optional kernel, looked up through the ``kernels`` package (a transformers dependency since 5.x):
    offline it logs that it skips the publisher trust check of ``kernels-community/quantization-bitsandbytes``,
    then bitsandbytes declines the kernel anyway (the notice above). Only that repository's notice is dropped."""

    def filter(self, record: _logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("Skipping publisher trust check" in message and "quantization-bitsandbytes" in message)


class _DropCpuAcceleratorNotice(_logging.Filter):
    """DeepSpeed logs a WARNING that it falls back to its CPU accelerator each time it is imported on a machine
    without GPUs; dlp imports it through transformers on every run, so on CPU that warning is the normal case."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropUnusedKernelNotice())
_logging.getLogger("kernels._internals.hf_hub").addFilter(_DropOfflineKernelTrustNotice())
_logging.getLogger("DeepSpeed").addFilter(_DropCpuAcceleratorNotice())
# trl's SFTConfig still sets the field transformers renamed; the user cannot act on the FutureWarning it causes
_warnings.filterwarnings("ignore", message="`(is_)?gradient_checkpointing` is deprecated", category=FutureWarning)
