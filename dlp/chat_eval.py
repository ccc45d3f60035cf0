"""Chat evaluation: can a pruned or recovered chat model still answer the way the dense model did?

Why this exists: WikiText perplexity (:mod:`dlp.evaluate`) measures how well a model continues encyclopedia text.
It says nothing about whether an Instruct model still follows its chat template, answers the question and ends
its turn, which is what pruning an Instruct model most easily breaks and what recovery on chat data should restore.

The reference answers are the dense model's own greedy answers to held-out chat prompts (prompts training never
sees), generated elsewhere and passed in as strings. These machines have no hub access and there are no human
labels, and the dense model's behaviour is exactly what a compressed copy should preserve. Every evaluated model
(dense, pruned, recovered) is scored on the same answers:

- **answer perplexity**: exp of the mean per-token negative log-likelihood of the dense answer's tokens given the
  prompt (teacher-forced), over all answer tokens of all prompts, end-of-turn tokens included as they are trained;
- **greedy match**: over the first ``match_tokens`` tokens of each dense answer, the share of positions where the
  model's argmax next token, teacher-forced on the prompt and the dense answer so far, is the dense answer's token.
  The dense model scores 1.00 on its own greedy answers, up to float ties. Teacher forcing instead of comparing
  free-running generations: once a free-running answer diverges by one token, everything after it is conditioned
  on different text, so a near-miss would score like a wrong answer.

Tokenization is exactly what trl's ``SFTTrainer`` trains on for a conversational prompt-completion example
(:func:`answer_token_ids`), so evaluation and recovery training see the same tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import require

MATCH_TOKENS = 32
_LARGEST_EXP = math.log(torch.finfo(torch.float64).max)  # a wrecked model's perplexity is inf, not an OverflowError


@dataclass(frozen=True)
class AnswerScores:
    prompts: int  # conversations scored (those with at least one answer token)
    answer_tokens: int  # tokens scored for the NLL (all answer tokens, EOS/end-of-turn tokens included, as trained)
    answer_nll: float  # mean per-token NLL (nats)
    answer_ppl: float  # exp(answer_nll)
    match_tokens: int  # positions compared for the greedy match (≤ match_tokens per prompt)
    greedy_match: float  # share of them where argmax == the dense answer's token
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"answer perplexity {self.answer_ppl:.2f} ({self.answer_tokens} tokens of {self.prompts} answers), "
            f"greedy match {self.greedy_match:.3f} ({self.match_tokens} tokens)"
        )


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Number of leading tokens two id lists share. A copy of trl's helper of the same name (``trl.data_utils``),
    which only recent trl versions have and which is not part of trl's public API."""
    length = 0
    for token, other_token in zip(ids, other_ids):
        if token != other_token:
            break
        length += 1
    return length


def _input_ids(encoded) -> list[int]:
    """The ids ``apply_chat_template(tokenize=True)`` returned: a BatchEncoding with ``input_ids`` (transformers 5,
    or ``return_dict=True``) or, from older versions or other tokenizer classes, the plain list."""
    ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
    return [int(token) for token in ids]


def answer_token_ids(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], int]:
    """(full ids, number of prompt tokens): the conversation's ids and where the answer starts.

    As trl's ``SFTTrainer`` tokenizes a conversational prompt-completion example: the prompt rendered alone with the
    generation prompt, the prompt followed by the answer as an assistant turn rendered in full, and the answer
    starting where the two diverge. That is not always the end of the prompt alone: some templates render the
    generation prompt differently when a completion follows, and tokens can merge across the boundary.
    """
    prompt_ids = _input_ids(
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    )
    conversation = list(prompt) + [{"role": "assistant", "content": answer}]
    full_ids = _input_ids(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True))
    return full_ids, common_prefix_length(prompt_ids, full_ids)


def _padded_logits(model: nn.Module, sequences: list[list[int]], device: str | torch.device) -> torch.Tensor:
    """Logits of the sequences padded on the right. Right padding keeps every real token at the position it has
    alone, and under causal attention with the attention mask no real token sees a pad (nor is a pad's query row
    left with nothing to attend to, which makes NaNs under left padding)."""
    ids = torch.zeros(len(sequences), max(map(len, sequences)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits


def _score_batch(
    model: nn.Module, batch: list[tuple[list[int], int]], match_tokens: int, device: str | torch.device
) -> tuple[float, int, int, int]:
    """(NLL sum, answer tokens, greedy matches, positions compared) of a batch of (full ids, answer start)."""
    logits = _padded_logits(model, [ids for ids, _ in batch], device)
    nll, tokens, matches, compared = 0.0, 0, 0, 0
    for row, (ids, answer_start) in enumerate(batch):
        first = max(answer_start, 1)  # a first token has nothing to be predicted from; trl's shifted loss skips it too
        targets = torch.tensor(ids[first:], device=logits.device)
        predicted = logits[row, first - 1 : len(ids) - 1].float()  # position t predicts token t + 1
        token_nll = -predicted.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        nll += float(token_nll.double().sum())
        head = min(match_tokens, len(targets))
        matches += int((predicted[:head].argmax(-1) == targets[:head]).sum())
        tokens, compared = tokens + len(targets), compared + head
    return nll, tokens, matches, compared


@torch.no_grad()
def answer_scores(
    model: nn.Module,
    tokenizer,
    prompts: list[list[dict]],
    answers: list[str],
    match_tokens: int = MATCH_TOKENS,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> AnswerScores:
    """Answer perplexity and greedy match of ``model`` on the dense model's ``answers`` to ``prompts`` (see the
    module docstring). ``model`` must already be on ``device`` and in eval mode (dropout would blur both scores);
    only the inputs are moved. Conversations run in batches of ``batch_size``, shortest first so that little is
    padded; the totals do not depend on the order. An answer whose conversation has no answer token (a template
    that drops assistant turns) is skipped and counted nowhere, not even in ``prompts``; at least one answer token
    overall is required.
    """
    require(len(prompts) == len(answers), f"{len(prompts)} prompts but {len(answers)} answers: need one answer each")
    require(len(prompts) > 0, "answer scoring needs at least one prompt and its answer")
    require(all(isinstance(answer, str) for answer in answers), "every answer must be a string")
    require(match_tokens >= 1, f"match_tokens must be >= 1 (got {match_tokens})")
    require(batch_size >= 1, f"batch_size must be >= 1 (got {batch_size})")
    start = time.perf_counter()
    conversations = [answer_token_ids(tokenizer, prompt, answer) for prompt, answer in zip(prompts, answers)]
    conversations = sorted((c for c in conversations if len(c[0]) > max(c[1], 1)), key=lambda c: len(c[0]))
    require(bool(conversations), "no answer tokens to score: the chat template renders no assistant turn")
    nll, tokens, matches, compared = 0.0, 0, 0, 0
    for begin in tqdm(range(0, len(conversations), batch_size), desc="scoring answers", unit="batch", leave=False):
        scores = _score_batch(model, conversations[begin : begin + batch_size], match_tokens, device)
        nll, tokens, matches, compared = (total + part for total, part in zip((nll, tokens, matches, compared), scores))
    mean_nll = nll / tokens
    return AnswerScores(
        prompts=len(conversations),
        answer_tokens=tokens,
        answer_nll=mean_nll,
        answer_ppl=math.exp(mean_nll) if mean_nll < _LARGEST_EXP else math.inf,
        match_tokens=compared,
        greedy_match=matches / compared,
        seconds=time.perf_counter() - start,
    )
