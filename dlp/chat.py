"""The dense model's answers in a run: self-generated training rows and the chat evaluation's references.

Both come from the dense model before compression, loaded once by :func:`dense_answers_stage` on the main process
(the other processes wait) and cached under the run directory (:mod:`dlp.selfgen`: keyed by the prompts', the
weights' and the settings' digests, resumable after a kill):

* ``selfgen/``: its answers to the training prompts (``train_data: selfgen:<prompts>``), which the compressed model
  is then fine-tuned on as conversations (prompt-completion rows: the loss on the answer only);
* ``chat_eval/``: its greedy answers to held-out prompts. Each evaluated model (dense, compressed, fine-tuned) is
  scored on them (:mod:`dlp.chat_eval`: answer perplexity and greedy match), and ``summary.md`` shows a few answers
  side by side.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .chat_eval import answer_scores
from .errors import require
from .prompts import PROMPT_SOURCES, builtin_prompts, prompt_of_row
from .rundir import atomic_write_json, read_json
from .selfgen import (
    GenerationSettings,
    answer_rows,
    cache_complete,
    cache_key,
    cached_answers,
    generate_batch,
    model_digest,
    read_answers,
)
from .sft_data import TrainRows, check_messages, is_selfgen, read_rows, selfgen_prompts_source

SELFGEN_DIR = "selfgen"
CHAT_EVAL_DIR = "chat_eval"
DENSE_SCORES = "dense_scores.json"
SECONDS = "seconds.json"


def prompt_set(source: str, count: int, field: str) -> list[list[dict[str, Any]]]:
    """The first ``count`` prompts of ``source``: a builtin set (:mod:`dlp.prompts`) or the rows of a local file
    (``prompt``, or ``messages`` up to their last user turn), each checked."""
    if source in PROMPT_SOURCES:
        return builtin_prompts(source, count)
    require(not source.startswith("builtin:"), f"{field}: unknown prompt set {source!r}; builtin: {PROMPT_SOURCES}")
    prompts = []
    for number, row in enumerate(read_rows(source, field=field, max_rows=count), 1):
        prompt = prompt_of_row(row, f"{field}: {source} row {number}")
        check_messages(prompt, f"{field}: {source} row {number}")
        prompts.append(prompt)
    return prompts


def training_prompts(ft_args, chat_args) -> list[list[dict[str, Any]]]:
    """The prompts the dense model answers for ``train_data: selfgen:<prompts>``."""
    return prompt_set(selfgen_prompts_source(ft_args.train_data), chat_args.selfgen_prompts, "train_data")


def heldout_prompts(chat_args) -> list[list[dict[str, Any]]]:
    """The chat evaluation's held-out prompts."""
    return prompt_set(chat_args.chat_eval_data, chat_args.chat_eval_prompts, "chat_eval_data")


def chat_eval_on(chat_args, tokenizer) -> bool:
    """``chat_eval`` true, or auto with a tokenizer that has a chat template (a base model has none to answer in)."""
    return chat_args.chat_eval == "true" or (chat_args.chat_eval == "auto" and bool(tokenizer.chat_template))


def selfgen_settings(chat_args, seed: int) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=chat_args.selfgen_max_new_tokens,
        sampling=chat_args.selfgen_sampling,
        temperature=chat_args.selfgen_temperature,
        top_p=chat_args.selfgen_top_p,
        seed=seed,
        batch_size=chat_args.selfgen_batch_size,
    )


def reference_settings(chat_args) -> GenerationSettings:
    """The chat evaluation's references are always greedy: the dense model's own most likely answer."""
    return GenerationSettings(
        max_new_tokens=chat_args.chat_eval_max_new_tokens, batch_size=chat_args.selfgen_batch_size
    )


def check_chat_settings(ft_args, chat_args, tokenizer, model: str) -> bool:
    """Before any stage runs: the prompt sets read and checked, held-out prompts disjoint from the training
    prompts, and a chat template where answers are asked for. Returns whether the chat evaluation is on."""
    evaluate = chat_eval_on(chat_args, tokenizer)
    training = []
    if is_selfgen(ft_args.train_data):
        require(
            tokenizer.chat_template,
            f"train_data: {ft_args.train_data} asks the dense model for chat answers, but the tokenizer of {model} has "
            "no chat template",
        )
        training = training_prompts(ft_args, chat_args)
    if evaluate:
        require(
            tokenizer.chat_template,
            f"chat_eval: the tokenizer of {model} has no chat template; set chat_eval false or auto",
        )
        heldout = heldout_prompts(chat_args)
        seen = {repr(prompt) for prompt in training}
        shared = sum(repr(prompt) in seen for prompt in heldout)
        require(
            shared == 0,
            f"chat_eval_data: {shared} of its prompts are also training prompts; held-out prompts must be unseen",
        )
    return evaluate


def _scores_file(out: Path) -> Path:
    return out / CHAT_EVAL_DIR / DENSE_SCORES


def dense_answers_stage(model_args, ft_args, chat_args, seed: int, out: Path, device, state, rows: bool, refs: bool):
    """On the main process, the dense model answers what the run needs (``rows``: the self-generated training
    data; ``refs``: the held-out references, which it also scores itself on); cached and resumable. The other
    processes wait, then read the caches."""
    if state.is_main_process and (rows or refs):
        model, tokenizer = _dense_model(model_args)
        digest = model_digest(model)
        if rows:
            prompts = training_prompts(ft_args, chat_args)
            settings = selfgen_settings(chat_args, seed)
            with _timed(out / SELFGEN_DIR, prompts, tokenizer, settings, digest):
                cached_answers(
                    model, tokenizer, prompts, out / SELFGEN_DIR, settings, digest, device, "self-generating"
                )
        if refs:
            prompts = heldout_prompts(chat_args)
            cache = out / CHAT_EVAL_DIR
            settings = reference_settings(chat_args)
            with _timed(cache, prompts, tokenizer, settings, digest):
                answers = cached_answers(model, tokenizer, prompts, cache, settings, digest, device, "dense references")
            key = read_json(cache / "manifest.json")["key"]
            if (read_json(_scores_file(out)) or {}).get("key") != key:
                scores = answer_scores(model.to(device), tokenizer, prompts, answers, device=device)
                atomic_write_json(_scores_file(out), {"key": key, "scores": scores.to_dict()})
        del model
    state.wait_for_everyone()


@contextmanager
def _timed(cache: Path, prompts, tokenizer, settings: GenerationSettings, digest: str):
    """Add the wall time of generating into ``cache`` to its ``seconds.json`` (over resumes: what it cost in all);
    a cache that was complete already (a rerun, or a copy of another run's) costs nothing and records nothing."""
    complete = cache_complete(cache, cache_key(prompts, digest, tokenizer, settings))
    start = time.perf_counter()
    yield
    if not complete:
        spent = (read_json(cache / SECONDS) or {}).get("seconds", 0.0) + time.perf_counter() - start
        atomic_write_json(cache / SECONDS, {"seconds": round(spent, 1)})


def generation_seconds(out: Path) -> dict[str, float]:
    """The report's timings of the dense answers: ``selfgen_s`` and ``chat_references_s`` where they ran."""
    names = {"selfgen_s": SELFGEN_DIR, "chat_references_s": CHAT_EVAL_DIR}
    found = {name: read_json(out / directory / SECONDS) for name, directory in names.items()}
    return {name: entry["seconds"] for name, entry in found.items() if entry}


def _dense_model(model_args):
    """The dense model as the user gave it, whole on this process (never ZeRO-3-partitioned: it only generates and
    scores) and in full precision even in a QLoRA run: its answers are the reference, not the 4-bit base's."""
    from .distributed import zero3_init_disabled
    from .modeling import load_model_and_tokenizer

    with zero3_init_disabled():
        return load_model_and_tokenizer(
            model_args.model_name_or_path, model_args.dtype or "float32", model_args.attn_implementation or "sdpa"
        )


def selfgen_rows(ft_args, chat_args, out: Path) -> TrainRows:
    """The self-generated training rows (the cache :func:`dense_answers_stage` filled), as conversational
    prompt-completion rows: trl trains on the answers only."""
    prompts = training_prompts(ft_args, chat_args)
    rows = answer_rows(prompts, read_answers(out / SELFGEN_DIR, len(prompts)))
    return TrainRows(ft_args.train_data, "prompt-completion", True, rows)


def reference_answers(chat_args, out: Path) -> tuple[list, list[str]]:
    """The held-out prompts and the dense model's cached answers to them."""
    prompts = heldout_prompts(chat_args)
    return prompts, read_answers(out / CHAT_EVAL_DIR, len(prompts))


@torch.no_grad()
def chat_evaluation(models: dict[str, Any], tokenizer, chat_args, out: Path, device) -> dict[str, Any]:
    """The chat section of ``eval.json``: each model's scores on the dense references (the dense model's own from
    the stage that generated them), and the first ``chat_eval_examples`` prompts with every model's greedy answer."""
    prompts, answers = reference_answers(chat_args, out)
    scores = {"dense": read_json(_scores_file(out))["scores"]}
    shown = prompts[: chat_args.chat_eval_examples]
    examples = [{"prompt": p[-1]["content"], "dense": a} for p, a in zip(shown, answers)]
    for name, model in models.items():
        scores[name] = answer_scores(model, tokenizer, prompts, answers, device=device).to_dict()
        print(
            f"[dlp] chat: {name} answer perplexity {scores[name]['answer_ppl']:.2f}, greedy match "
            f"{scores[name]['greedy_match']:.3f}"
        )
        if shown:
            said = generate_batch(model, tokenizer, shown, reference_settings(chat_args), device)
            for example, answer in zip(examples, said):
                example[name] = answer
    return {"prompts": chat_args.chat_eval_data, "count": len(prompts), "scores": scores, "examples": examples}
