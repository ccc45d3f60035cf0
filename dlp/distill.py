"""Distillation from the dense model during recovery: the loss and the two teachers (:mod:`dlp.trainer` trains).

The fine-tuning loss becomes ``(1 − w)·LM + w·T²·KL(p_teacher ‖ p_student)`` per predicted token, with both
distributions taken at temperature ``T`` (the T² keeps the KL's gradients on the LM loss's scale, as in Hinton et
al.). Every sum runs over the predicted tokens and is divided by the same count trl's SFT loss uses, so ``w = 0``
is the plain LM loss of today's stage.

Two teachers, because memory is what users run out of:

* :class:`OnlineTeacher` runs the teacher model beside the student on each micro-batch (every rank on its own);
* :class:`CachedTeacher` reads the teacher's top-k log-probabilities per position, computed once for every
  training window by :func:`build_teacher_cache` into ``output_dir/teacher/`` (a resumable stage: shards are
  written atomically and a rerun computes only the missing ones), so training holds no teacher.

On a cached support S the KL keeps the teacher's exact probabilities p_t(v), v ∈ S (log-softmax over the whole
vocabulary, cached), and gathers the rest of the vocabulary into one *tail* bucket on each side:
``KL_S = Σ_{v∈S} p_t(v)·log(p_t(v)/p_s(v)) + τ_t·log(τ_t/τ_s)`` with τ = 1 − Σ_{v∈S} p(v). This is the KL of the two
distributions coarsened to S ∪ {tail}: never larger than the full KL, equal to it when S is the whole vocabulary,
and it still pulls the student's mass off tokens outside the teacher's top k (a renormalised top-k KL would not).

The trainer finds a window's cached targets by the hash of its token ids, so the dataset and trl's collator stay
exactly as in the plain stage (and windows are drawn in the same order).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import require
from .rundir import atomic_file, atomic_write_json, read_json

CACHE_DIR = "teacher"
SHARD_WINDOWS = 16  # windows per cache shard: the unit a killed caching run loses at most


@dataclass(frozen=True)
class Targets:
    """The teacher's log-probabilities at temperature T for the predicted positions: over the whole vocabulary
    (``indices`` None) or over a support given by ``indices`` (both ``[tokens, k]``)."""

    log_probs: torch.Tensor
    indices: torch.Tensor | None = None


def kl_sum(student_logits: torch.Tensor, targets: Targets, temperature: float) -> torch.Tensor:
    """Σ over tokens of KL(teacher ‖ student) at ``temperature``; ``student_logits`` is ``[tokens, vocab]``."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = targets.log_probs.float()
    if targets.indices is None:
        return (log_teacher.exp() * (log_teacher - log_student)).sum()
    return support_kl(log_teacher, log_student.gather(-1, targets.indices.long())).sum()


def support_kl(log_teacher: torch.Tensor, log_student: torch.Tensor) -> torch.Tensor:
    """Per token, the KL over a support S plus the tail bucket (the module docstring's KL_S), from both sides'
    log-probabilities on S (``[tokens, k]``, float32)."""
    teacher_support = log_teacher.exp()
    kl = (teacher_support * (log_teacher - log_student)).sum(-1)
    teacher_tail = (1.0 - teacher_support.sum(-1)).clamp(min=0.0)
    student_tail = (1.0 - log_student.exp().sum(-1)).clamp(min=1e-12)
    tail = torch.where(teacher_tail > 0, teacher_tail * (teacher_tail.clamp(min=1e-12).log() - student_tail.log()), 0.0)
    return kl + tail


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    targets: Targets | None,
    weight: float,
    temperature: float,
    num_items: torch.Tensor | int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, LM part, KL part) of a micro-batch: ``student_logits`` ``[B, L, V]``, ``labels`` ``[B, L]`` (−100:
    not predicted); ``targets`` covers the predicted positions in order (None: no teacher, the LM loss alone). Each
    part is a sum over tokens divided by ``num_items`` (the tokens of the whole accumulated batch, as in trl's
    loss)."""
    logits, shifted = student_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    predicted = shifted != -100
    if not bool(predicted.all()):  # index_select: its backward adds rows back; a boolean index's is slower
        rows = predicted.nonzero().squeeze(1)
        logits, shifted = logits.index_select(0, rows), shifted[rows]
    lm = F.cross_entropy(logits.float(), shifted, reduction="sum") / num_items
    if targets is None:
        return lm, lm.detach(), torch.zeros_like(lm)
    kl = kl_sum(logits, targets, temperature) * temperature**2 / num_items
    return (1.0 - weight) * lm + weight * kl, lm.detach(), kl.detach()


def window_key(window: torch.Tensor) -> str:
    """A training window's identity: the SHA-1 of its token ids (int64), wherever the trainer put it."""
    return hashlib.sha1(window.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


class OnlineTeacher:
    """The teacher model, run on each micro-batch beside the student (no gradients, its own device copy)."""

    mode = "online"

    def __init__(self, model: nn.Module, temperature: float):
        self.model = model.eval().requires_grad_(False)
        self.temperature = temperature

    @torch.no_grad()
    def targets(self, input_ids: torch.Tensor, predicted: torch.Tensor) -> Targets:
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=input_ids.to(device), use_cache=False).logits[:, :-1]
        log_probs = F.log_softmax(logits[predicted.to(device)].float() / self.temperature, dim=-1)
        return Targets(log_probs.to(input_ids.device))


class CachedTeacher:
    """Top-k teacher targets from :func:`build_teacher_cache`, looked up by window; shards load on first use."""

    mode = "cached"

    def __init__(self, cache_dir: Path, windows: torch.Tensor):
        self.dir = Path(cache_dir)
        manifest = read_json(self.dir / "manifest.json")
        require(manifest is not None, f"distillation: no teacher cache in {self.dir}")
        self.shard_windows = manifest["shard_windows"]
        self.index = {window_key(window): i for i, window in enumerate(windows)}
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    def _row(self, window: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        index = self.index.get(window_key(window))
        require(
            index is not None,
            "distillation: a training window is not in the teacher cache (was it built from other training data?)",
        )
        shard = index // self.shard_windows
        if shard not in self._shards:
            from safetensors.torch import load_file

            self._shards[shard] = load_file(str(self.dir / shard_name(shard)))
        return self._shards[shard], index % self.shard_windows

    def targets(self, input_ids: torch.Tensor, predicted: torch.Tensor) -> Targets:
        log_probs, indices = [], []
        for window, keep in zip(input_ids, predicted):
            shard, row = self._row(window)
            log_probs.append(shard["log_probs"][row][keep.cpu()])
            indices.append(shard["indices"][row][keep.cpu()])
        device = input_ids.device
        return Targets(torch.cat(log_probs).to(device), torch.cat(indices).to(device))


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def cache_key(windows: torch.Tensor, teacher: str, top_k: int, temperature: float) -> str:
    """What the cached targets depend on: the windows' token ids, the teacher, k and the temperature."""
    digest = hashlib.sha256(str(tuple(windows.shape)).encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(json.dumps([teacher, top_k, temperature]).encode())
    return digest.hexdigest()


@torch.no_grad()
def build_teacher_cache(
    model: nn.Module,
    windows: torch.Tensor,
    cache_dir: Path,
    *,
    key: str,
    top_k: int,
    temperature: float,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The teacher's top-k log-probabilities (at ``temperature``, over the whole vocabulary) for every position of
    every window that predicts a next token, shard by shard into ``cache_dir``; shards already there (written
    atomically by an earlier run of the same key) are kept, so a killed run resumes where it stopped."""
    cache_dir = Path(cache_dir)
    manifest = read_json(cache_dir / "manifest.json")
    if manifest is not None and manifest.get("key") != key:  # another recipe's cache: dlp's own files, replaced
        for path in cache_dir.glob("shard-*.safetensors"):
            path.unlink()
        manifest = None
    vocab = model.get_output_embeddings().weight.shape[0]
    top_k = min(top_k, vocab)
    shards = math.ceil(windows.shape[0] / SHARD_WINDOWS)
    manifest = {
        "key": key,
        "windows": windows.shape[0],
        "seqlen": windows.shape[1],
        "top_k": top_k,
        "temperature": temperature,
        "shard_windows": SHARD_WINDOWS,
        "shards": shards,
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache_dir / "manifest.json", manifest)
    model = model.eval().to(device)
    todo = [shard for shard in range(shards) if not (cache_dir / shard_name(shard)).is_file()]
    for shard in tqdm(todo, desc="caching teacher logits", unit="shard"):
        part = windows[shard * SHARD_WINDOWS : (shard + 1) * SHARD_WINDOWS]
        values, indices = [], []
        for start in range(0, part.shape[0], batch_size):
            logits = model(input_ids=part[start : start + batch_size].to(device), use_cache=False).logits[:, :-1]
            top = F.log_softmax(logits.float() / temperature, dim=-1).topk(top_k, dim=-1, sorted=True)
            values.append(top.values.cpu())
            indices.append(top.indices.to(torch.int32).cpu())
        _save_shard(cache_dir / shard_name(shard), torch.cat(values), torch.cat(indices))
    return manifest


def _save_shard(path: Path, log_probs: torch.Tensor, indices: torch.Tensor) -> None:
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({"log_probs": log_probs.contiguous(), "indices": indices.contiguous()}, str(tmp))


def cache_complete(cache_dir: Path, key: str) -> bool:
    manifest = read_json(Path(cache_dir) / "manifest.json")
    return (
        manifest is not None
        and manifest.get("key") == key
        and all((Path(cache_dir) / shard_name(s)).is_file() for s in range(manifest["shards"]))
    )
