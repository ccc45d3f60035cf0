"""The compression stages, one module per method, and the registry the pipeline looks them up in.

* :mod:`dlp.stages.prune_stage` — layerwise-allocated pruning with fixed masks (``method: prune``, ``train/prune.py``);
* :mod:`dlp.stages.slice_stage` — rotate-and-slice with per-layer widths (``method: slice``, ``train/slice.py``).

A new method is a module here that registers a :class:`~dlp.stages.method.CompressionMethod`, and its import below.
"""

from . import prune_stage, slice_stage  # noqa: F401  (each registers its method)
from .method import METHODS, CompressionMethod, get_method, register

__all__ = ["METHODS", "CompressionMethod", "get_method", "register"]
