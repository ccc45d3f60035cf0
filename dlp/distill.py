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
from .rundir import cache_complete as sharded_cache_complete, atomic_file, atomic_write_json, read_json

CACHE_DIR = "teacher"
SHARD_SEQUENCES = 16  # sequences per cache shard: the unit a killed caching run loses at most


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
    def targets(self, inputs: dict[str, torch.Tensor], predicted: torch.Tensor) -> Targets:
        """The teacher's log-probabilities where the student is trained: the same ``inputs`` (ids, attention
        mask or packed position ids), so it sees exactly the student's tokens and sequence boundaries."""
        device = next(self.model.parameters()).device
        moved = {name: value.to(device) if torch.is_tensor(value) else value for name, value in inputs.items()}
        logits = self.model(**moved, use_cache=False).logits[:, :-1]
        log_probs = F.log_softmax(logits[predicted.to(device)].float() / self.temperature, dim=-1)
        return Targets(log_probs.to(inputs["input_ids"].device))


def sequences_of_row(input_ids: torch.Tensor, attention_mask=None, position_ids=None) -> list[tuple[int, int]]:
    """The ``(start, end)`` spans of the separate sequences in one batch row: packed sequences start where the
    position ids restart at 0 (trl's padding-free collator), a padded row ends at its attention mask's last 1
    (trl pads on the right), and a plain window is one sequence."""
    length = input_ids.shape[0]
    if position_ids is not None:
        starts = (position_ids == 0).nonzero().flatten().tolist()
        return [(a, b) for a, b in zip(starts, starts[1:] + [length])]
    end = int(attention_mask.sum()) if attention_mask is not None else length
    return [(0, end)]


class CachedTeacher:
    """Top-k teacher targets from :func:`build_teacher_cache`, looked up per sequence by its token ids (a window,
    a padded example or one of the sequences packed into a row); shards load on first use."""

    mode = "cached"

    def __init__(self, cache_dir: Path, sequences: list[torch.Tensor]):
        self.dir = Path(cache_dir)
        manifest = read_json(self.dir / "manifest.json")
        require(manifest is not None, f"distillation: no teacher cache in {self.dir}")
        self.shard_sequences = manifest["shard_sequences"]
        self.index = {window_key(sequence): i for i, sequence in enumerate(sequences)}
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    def _sequence(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached (log-probabilities, indices) ``[len − 1, k]`` of one sequence."""
        index = self.index.get(window_key(ids))
        require(
            index is not None,
            "distillation: a training sequence is not in the teacher cache (was it built from other training data?)",
        )
        shard = index // self.shard_sequences
        if shard not in self._shards:
            from safetensors.torch import load_file

            self._shards[shard] = load_file(str(self.dir / shard_name(shard)))
        tensors = self._shards[shard]
        row = index % self.shard_sequences
        start, end = int(tensors["offsets"][row]), int(tensors["offsets"][row + 1])
        return tensors["log_probs"][start:end], tensors["indices"][start:end]

    def targets(self, inputs: dict[str, torch.Tensor], predicted: torch.Tensor) -> Targets:
        input_ids = inputs["input_ids"]
        log_probs, indices = [], []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b].cpu()
            mask, positions = (inputs.get(name) for name in ("attention_mask", "position_ids"))
            spans = sequences_of_row(
                ids, None if mask is None else mask[b].cpu(), None if positions is None else positions[b].cpu()
            )
            keep = predicted[b].cpu()
            for start, end in spans:
                values, support = self._sequence(ids[start:end])
                inside = keep[start : end - 1]
                log_probs.append(values[inside])
                indices.append(support[inside])
            covered = sum(int(keep[start : end - 1].sum()) for start, end in spans)
            require(covered == int(keep.sum()), "distillation: a trained position lies outside every sequence")
        device = input_ids.device
        return Targets(torch.cat(log_probs).to(device), torch.cat(indices).to(device))


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


CACHE_FORMAT = 2  # 2: one entry per sequence (offsets); 1 held fixed-length windows only


def cache_key(sequences: list[torch.Tensor], teacher: str, top_k: int, temperature: float) -> str:
    """What the cached targets depend on: every sequence's token ids, the teacher, k and the temperature."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, len(sequences)]).encode())
    for sequence in sequences:
        digest.update(str(sequence.numel()).encode())
        digest.update(sequence.to(torch.int64).contiguous().numpy().tobytes())
    digest.update(json.dumps([teacher, top_k, temperature]).encode())
    return digest.hexdigest()


@torch.no_grad()
def _teacher_top_k(model, batch: list[torch.Tensor], top_k: int, temperature: float, device) -> list[tuple]:
    """(log-probabilities, indices) ``[len − 1, k]`` of each sequence in ``batch``, run right-padded together."""
    length = max(sequence.numel() for sequence in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for row, sequence in enumerate(batch):
        ids[row, : sequence.numel()], mask[row, : sequence.numel()] = sequence, 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits[:, :-1]
    top = F.log_softmax(logits.float() / temperature, dim=-1).topk(top_k, dim=-1, sorted=True)
    values, indices = top.values.cpu(), top.indices.to(torch.int32).cpu()
    return [(values[row, : s.numel() - 1], indices[row, : s.numel() - 1]) for row, s in enumerate(batch)]


@torch.no_grad()
def build_teacher_cache(
    model: nn.Module,
    sequences: list[torch.Tensor],
    cache_dir: Path,
    *,
    key: str,
    top_k: int,
    temperature: float,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The teacher's top-k log-probabilities (at ``temperature``, over the whole vocabulary) for every position of
    every training sequence that predicts a next token, shard by shard into ``cache_dir``; shards already there
    (written atomically by an earlier run of the same key) are kept, so a killed run resumes where it stopped."""
    cache_dir = Path(cache_dir)
    manifest = read_json(cache_dir / "manifest.json")
    if manifest is not None and manifest.get("key") != key:  # another recipe's cache: dlp's own files, replaced
        for path in cache_dir.glob("shard-*.safetensors"):
            path.unlink()
        manifest = None
    vocab = model.get_output_embeddings().weight.shape[0]
    top_k = min(top_k, vocab)
    shards = math.ceil(len(sequences) / SHARD_SEQUENCES)
    manifest = {
        "key": key,
        "sequences": len(sequences),
        "positions": sum(sequence.numel() - 1 for sequence in sequences),
        "top_k": top_k,
        "temperature": temperature,
        "shard_sequences": SHARD_SEQUENCES,
        "shards": shards,
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache_dir / "manifest.json", manifest)
    model = model.eval().to(device)
    todo = [shard for shard in range(shards) if not (cache_dir / shard_name(shard)).is_file()]
    for shard in tqdm(todo, desc="caching teacher logits", unit="shard"):
        part = sequences[shard * SHARD_SEQUENCES : (shard + 1) * SHARD_SEQUENCES]
        rows = []
        for start in range(0, len(part), batch_size):
            rows += _teacher_top_k(model, part[start : start + batch_size], top_k, temperature, device)
        offsets = torch.tensor([0] + [values.shape[0] for values, _ in rows]).cumsum(0)
        _save_shard(
            cache_dir / shard_name(shard), torch.cat([v for v, _ in rows]), torch.cat([i for _, i in rows]), offsets
        )
    return manifest


def _save_shard(path: Path, log_probs: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tensors = {"log_probs": log_probs.contiguous(), "indices": indices.contiguous(), "offsets": offsets.contiguous()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp))


def cache_complete(cache_dir: Path, key: str) -> bool:
    """Whether ``cache_dir`` holds every shard of the cache with ``key``."""
    return sharded_cache_complete(cache_dir, key, shard_name)
