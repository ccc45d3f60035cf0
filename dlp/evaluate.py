"""Evaluation: WikiText-2 perplexity with the standard protocol, and lm-eval zero-shot tasks when installed.

Perplexity protocol (as in the SparseGPT/Wanda/DLP papers): the test split's text (see :mod:`dlp.data` for how
a file or a hub dataset becomes one text) is tokenized once; the stream is cut into non-overlapping windows of
``seqlen`` tokens from its start; perplexity is exp of the mean negative log-likelihood over every predicted token
(seqlen − 1 per
window). Every figure is reported with ``seqlen`` and the number of windows.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import consecutive_windows, load_token_stream
from .errors import require


@dataclass(frozen=True)
class Perplexity:
    value: float
    source: str
    seqlen: int
    windows: int
    tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.2f} ({self.windows}×{self.seqlen} tokens of {self.source})"


def eval_stream(tokenizer, source: str, min_tokens: int | None = None) -> torch.Tensor:
    """Token stream of an evaluation source: its whole text tokenized once, or (``min_tokens``) only as much of it
    as that many tokens need, with the same ids (:func:`dlp.data.load_token_stream`)."""
    return load_token_stream(tokenizer, source, "test", min_tokens)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    source: str,
    seqlen: int = 512,
    max_windows: int | None = 64,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    stream: torch.Tensor | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on ``source`` (see module docstring for the protocol)."""
    require(seqlen >= 2, f"eval_seqlen must be >= 2 (got {seqlen})")
    start = time.perf_counter()
    if stream is None:
        stream = eval_stream(tokenizer, source, seqlen * max_windows if max_windows else None)
    windows = consecutive_windows(stream, seqlen, max_windows)
    home = next(model.parameters()).device
    model.to(device)
    total_nll, total_tokens = 0.0, 0
    for begin in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", unit="batch"):
        ids = windows[begin : begin + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = ids[:, 1:]
        total_nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        total_tokens += targets.numel()
    model.to(home)
    return Perplexity(
        math.exp(total_nll / total_tokens), source, seqlen, windows.shape[0], total_tokens, time.perf_counter() - start
    )


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def zero_shot(model: nn.Module, tokenizer, tasks: list[str], batch_size: int = 8, limit: int | None = None) -> dict:
    """Zero-shot accuracy with EleutherAI's lm-eval (``pip install dlp[eval]``); tasks need their datasets."""
    require(lm_eval_available(), "eval_tasks needs the optional package lm-eval: pip install 'dlp[eval]'")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=wrapped, tasks=tasks, num_fewshot=0, limit=limit)["results"]
    return {
        task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))} for task, metrics in results.items()
    }
