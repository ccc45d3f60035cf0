"""Self-generated recovery data: the dense model answers chat prompts, the pruned model is fine-tuned on the answers.

Why: fine-tuning a pruned model on the *dense model's own* answers to instructions recovers it better than
fine-tuning on human-written answers, whose distribution the model never matched (Thangarasa et al. 2024,
"self-data distillation"): the data asks the pruned model to become the dense model again, not something new.
And these machines are often offline, so the dense model is also the only source of instruction data there is.

The answers are cached under the run directory, in shards of :data:`SHARD_PROMPTS` prompts
(``shard-00000.jsonl``, one ``{"answer": ...}`` per line), each written atomically, beside a ``manifest.json``
that records the cache's key: the sha256 of everything the answers depend on (the prompts, the model's weights,
the generation settings, the chat template, the tokenizer's size and EOS, the shard size). A rerun with the same key
reuses the shards on disk and generates only the missing ones, so a killed generation loses at most one shard;
a cache with another key is another recipe's and its shards are replaced. A resumed run gives exactly the data of an
uninterrupted one: shards are generated independently (greedy decoding, or sampling seeded from the settings' seed
and the shard's index) in the same batches, and the answers do not depend on the checkpoint's
``generation_config.json`` (which the key does not cover): generation runs on a plain configuration built from the
settings alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import require
from .rundir import cache_complete as sharded_cache_complete, atomic_write_json, atomic_write_text, read_json

SHARD_PROMPTS = 32  # prompts per cache shard: the unit a killed generation loses at most
SAMPLING_MODES = ("greedy", "sample")

Prompt = list[dict[str, Any]]  # a conversation without its answer: [{"role": ..., "content": ...}, ...]


@dataclass(frozen=True)
class GenerationSettings:
    """How the dense model answers. ``batch_size`` is part of the recipe: left padding changes float rounding, so
    other batches may give (slightly) other answers; ``seed`` seeds each shard's sampling on its own, so a resumed
    run draws what an uninterrupted one would have."""

    max_new_tokens: int = 128
    sampling: str = "greedy"  # "greedy" or "sample"
    temperature: float = 0.7  # sample only
    top_p: float = 0.9  # sample only
    seed: int = 0  # sample only
    batch_size: int = 16  # prompts per generate() call

    def __post_init__(self) -> None:
        require(
            self.sampling in SAMPLING_MODES,
            f"selfgen_sampling must be one of {', '.join(SAMPLING_MODES)} (got {self.sampling!r})",
        )
        require(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, _int_message("max_new_tokens", self))
        require(_is_int(self.batch_size) and self.batch_size >= 1, _int_message("batch_size", self))
        require(_is_int(self.seed), f"selfgen_seed must be an integer (got {self.seed!r})")
        require(
            _is_number(self.temperature) and self.temperature > 0,
            f"selfgen_temperature must be > 0 (got {self.temperature!r})",
        )
        require(
            _is_number(self.top_p) and 0 < self.top_p <= 1,
            f"selfgen_top_p must be in (0, 1] (got {self.top_p!r})",
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields that change the answers (the cache key's part): greedy decoding ignores the sampling ones, so
        changing them does not throw a greedy cache away."""
        fields = asdict(self)
        if self.sampling == "greedy":
            for name in ("temperature", "top_p", "seed"):
                del fields[name]
        return fields


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_message(name: str, settings: GenerationSettings) -> str:
    return f"selfgen_{name} must be an integer >= 1 (got {getattr(settings, name)!r})"


def model_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer of the model (name, shape, dtype, bytes) in state_dict order: the
    answers' dependence on the weights, in the cache key (the model's name alone would not see a local edit)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype)]).encode())
        # bytes through a uint8 view: numpy has no bfloat16
        digest.update(tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cache_key(prompts: list[Prompt], model_digest: str, tokenizer: Any, settings: GenerationSettings) -> str:
    """What the cached answers depend on: the prompts, the weights, the settings, how prompts become token ids and
    where answers stop (the chat template, the vocabulary's size, EOS), and how prompts are cut into shards."""
    parts = [
        prompts,
        model_digest,
        settings.to_dict(),
        tokenizer.chat_template,
        len(tokenizer),
        tokenizer.eos_token_id,
        SHARD_PROMPTS,
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.jsonl"


def cache_complete(cache_dir: Path, key: str) -> bool:
    """Whether ``cache_dir`` holds every shard of the cache with ``key``."""
    return sharded_cache_complete(cache_dir, key, shard_name)


def _render(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The prompt's token ids as the chat template renders it, ending where the assistant's answer starts. The
    template writes its own special tokens (BOS among them), as in transformers' and trl's own rendering."""
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@contextmanager
def _plain_generation_config(model: nn.Module) -> Iterator[None]:
    """Generate without the checkpoint's ``generation_config.json`` (its top_k, repetition penalty, extra EOS ids):
    transformers fills every value a call leaves unset from it, and the cache key does not cover it."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def _generation_kwargs(tokenizer: Any, settings: GenerationSettings) -> dict[str, Any]:
    eos = tokenizer.eos_token_id
    require(eos is not None, "self-generated data: the tokenizer has no EOS token, so answers would never stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "eos_token_id": eos, "pad_token_id": pad}
    if settings.sampling == "greedy":
        return {**kwargs, "do_sample": False}
    # top_k=0: nucleus sampling only, not also transformers' default top_k=50
    return {**kwargs, "do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}


def _left_pad(rows: list[list[int]], pad: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with the rows padded on the left, so every row's answer starts at the same
    column; generate derives the positions from the mask."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_ids(
    model: nn.Module, tokenizer: Any, prompts: list[Prompt], settings: GenerationSettings, device="cpu"
) -> list[list[int]]:
    """The answer's token ids per prompt, up to and without the first EOS (see :func:`generate_batch`). Prompts are
    batched in the order of their lengths, so a batch wastes little on padding; the order is fixed by the prompts,
    so the same prompts always meet in the same batches."""
    model.eval()
    rendered = [_render(tokenizer, prompt) for prompt in prompts]
    kwargs = _generation_kwargs(tokenizer, settings)
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    with _plain_generation_config(model):
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            ids, mask = _left_pad([rendered[i] for i in batch], kwargs["pad_token_id"], device)
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            for i, row in zip(batch, out[:, ids.shape[1] :].tolist()):
                answers[i] = row[: row.index(kwargs["eos_token_id"])] if kwargs["eos_token_id"] in row else row
    return answers


def generate_batch(
    model: nn.Module, tokenizer: Any, prompts: list[Prompt], settings: GenerationSettings, device="cpu"
) -> list[str]:
    """One answer per prompt: the prompt rendered by the chat template with the generation prompt, left-padded in
    batches of ``settings.batch_size`` (pad: the tokenizer's pad token, else EOS), answered greedily or sampled for up
    to ``max_new_tokens`` tokens, stopping at the tokenizer's EOS; the new tokens decoded without special tokens and
    stripped. The tokenizer is left unchanged (padding is done here, not through its ``padding_side``)."""
    ids = generate_ids(model, tokenizer, prompts, settings, device)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def _write_shard(path: Path, answers: list[str]) -> None:
    atomic_write_text(path, "".join(json.dumps({"answer": a}, ensure_ascii=False) + "\n" for a in answers))


def _read_shard(path: Path, expected: int) -> list[str] | None:
    """A shard's answers, or None when it is missing or not what this cache writes (then it is generated again)."""
    if not path.is_file():
        return None
    try:
        answers = [json.loads(line)["answer"] for line in path.read_text(encoding="utf-8").splitlines()]
    except (ValueError, KeyError, TypeError):
        return None
    ok = len(answers) == expected and all(isinstance(a, str) for a in answers)
    return answers if ok else None


def _shard_seed(seed: int, shard: int) -> int:
    """Each shard's sampling seed, from the settings' seed and the shard alone (a resumed run draws the same)."""
    return (seed * 1_000_003 + shard) % 2**63


def _start_cache(cache_dir: Path, key: str, manifest: dict[str, Any]) -> None:
    """Write the manifest of the cache about to be filled; the shards of any other (or unknown) key are another
    recipe's answers: removed (dlp's own files: shard-*.jsonl, never anything else in the directory)."""
    old = read_json(cache_dir / "manifest.json")
    if old is None or old.get("key") != key:
        for path in cache_dir.glob("shard-*.jsonl"):
            path.unlink()
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cache_dir / "manifest.json", manifest)


def cached_answers(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[Prompt],
    cache_dir: Path,
    settings: GenerationSettings,
    model_digest: str,
    device="cpu",
    desc: str = "generating answers",
) -> list[str]:
    """The model's answers to ``prompts`` (in their order), generated shard by shard into ``cache_dir``; shards a
    run with the same key wrote are reused, so a killed run resumes where it stopped (see the module docstring).
    The model is moved to ``device`` only if some shard is missing."""
    cache_dir = Path(cache_dir)
    key = cache_key(prompts, model_digest, tokenizer, settings)
    shards = math.ceil(len(prompts) / SHARD_PROMPTS)
    manifest = {"key": key, "prompts": len(prompts), "shard_prompts": SHARD_PROMPTS, "shards": shards}
    manifest["settings"] = settings.to_dict()
    _start_cache(cache_dir, key, manifest)
    parts = [prompts[s * SHARD_PROMPTS : (s + 1) * SHARD_PROMPTS] for s in range(shards)]
    done = {s: _read_shard(cache_dir / shard_name(s), len(parts[s])) for s in range(shards)}
    todo = [s for s in range(shards) if done[s] is None]
    if todo:
        model = model.eval().to(device)
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        # the caller's random state is left as it was: a resumed run and an uninterrupted one continue alike
        with torch.random.fork_rng(devices=cuda), tqdm(total=shards, initial=shards - len(todo), desc=desc) as bar:
            for s in todo:
                torch.manual_seed(_shard_seed(settings.seed, s))
                done[s] = generate_batch(model, tokenizer, parts[s], settings, device)
                _write_shard(cache_dir / shard_name(s), done[s])
                bar.update()
    answers = [answer for s in range(shards) for answer in done[s]]
    atomic_write_json(cache_dir / "manifest.json", {**manifest, "empty_answers": sum(not a for a in answers)})
    return answers


def answer_rows(prompts: list[Prompt], answers: list[str]) -> list[dict[str, Any]]:
    """The (prompt, answer) pairs as trl's conversational prompt-completion rows, so SFT trains on the answer only:
    ``{"prompt": messages, "completion": [{"role": "assistant", "content": answer}]}``."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    return [
        {"prompt": list(prompt), "completion": [{"role": "assistant", "content": answer}]}
        for prompt, answer in zip(prompts, answers)
    ]


def read_answers(cache_dir: Path, count: int) -> list[str]:
    """The answers of a finished cache (the processes that did not generate read them after the main one did)."""
    cache_dir = Path(cache_dir)
    manifest = read_json(cache_dir / "manifest.json")
    require(
        manifest is not None and manifest.get("prompts") == count and "empty_answers" in manifest,
        f"selfgen: {cache_dir} holds no finished answers for {count} prompts",
    )
    size = manifest["shard_prompts"]
    answers: list[str] = []
    for shard in range(manifest["shards"]):
        part = _read_shard(cache_dir / shard_name(shard), min(size, count - shard * size))
        require(part is not None, f"selfgen: {cache_dir / shard_name(shard)} is missing or damaged")
        answers += part
    return answers
