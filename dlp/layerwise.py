"""Deprecated: renamed :mod:`dlp.pruner` (the calibration-driven pruner) in the 2026-11 restructuring; this alias
goes in a later release.

``PruneSpec`` and ``prune_linear`` now live in :mod:`dlp.criteria`; ``score_layers(keep_stats=True)`` returns the
statistics on its result instead of filling a dict the caller passed in.
"""

import warnings

from .criteria import PruneSpec, prune_linear  # noqa: F401
from .pruner import MODES, layer_param_counts, prune_model  # noqa: F401
from .scoring import Scoring, score_layers  # noqa: F401

warnings.warn(
    "dlp.layerwise is deprecated: import from dlp.pruner (and PruneSpec from dlp.criteria)",
    DeprecationWarning,
    stacklevel=2,
)
