"""dlp: Dynamic Layerwise Pruning with fixed masks for Hugging Face causal LMs."""

__version__ = "0.1.0"
