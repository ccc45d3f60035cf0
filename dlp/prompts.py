"""Chat prompts for self-generated data and for the chat evaluation: built from shipped text, or read from a file.

These machines often have no hub access, so dlp builds instruction prompts offline from the WikiText-2 valid
paragraphs it ships (``dlp/builtin_data``, CC BY-SA 3.0): each prompt is an instruction (summarise, continue, ask
and answer a question, name the topic, simplify, list facts) followed by one paragraph. The test split is never
used: it is the perplexity text.

Two disjoint sets, so that the chat evaluation scores prompts training never sees:

* ``builtin:wikitext2-heldout-prompts``: the last ``HELDOUT_PARAGRAPHS`` eligible paragraphs of the file, each
  instruction in turn (so up to 6 × 40 prompts). They lie in its last 9% of tokens, which the default WikiText
  recovery (240 steps × 2 × 512 tokens read from the start, 246k of SmolLM2's 274k) does not reach either;
* ``builtin:wikitext2-prompts``: every other eligible paragraph, each instruction in turn (prompt k pairs paragraph
  k mod P with instruction (k div P + k) mod 6), so more prompts than paragraphs repeat a paragraph with another
  instruction.

A file source (``.jsonl``, ``.json`` or ``.parquet``) gives one prompt per row: ``prompt`` as a string or as a list
of messages, or ``messages`` without their last assistant turn.
"""

from __future__ import annotations

import gzip
import re

from .data import BUILTIN_SOURCES
from .errors import require

TRAIN_PROMPTS = "builtin:wikitext2-prompts"
HELDOUT_PROMPTS = "builtin:wikitext2-heldout-prompts"
PROMPT_SOURCES = (TRAIN_PROMPTS, HELDOUT_PROMPTS)
HELDOUT_PARAGRAPHS = 40
MIN_WORDS, MAX_WORDS = 40, 200  # a paragraph long enough to say something, short enough to leave room to answer
MAX_UNKNOWN = 6  # WikiText's <unk> (a rare word it removed) at most this often per paragraph
PROMPT_WORDS = 120  # a longer paragraph is cut after the sentence that reaches this many words

INSTRUCTIONS = (
    "Summarize the following paragraph in one or two sentences.",
    "Continue this text with the next few sentences.",
    "Write one question that this paragraph answers, then answer it.",
    "What is the main topic of this paragraph? Explain briefly.",
    "Rewrite this paragraph in simpler words.",
    "List three facts stated in this paragraph.",
)

# WikiText's tokenized markup, undone so the prompts read as plain text
_MARKUP = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" ,", ","), (" .", "."), (" ;", ";"), (" :", ":"))
_MARKUP += ((" 's", "'s"), ("( ", "("), (" )", ")"), (" n't", "n't"), ("<unk>", "[unknown]"))


def _plain(paragraph: str) -> str:
    for old, new in _MARKUP:
        paragraph = paragraph.replace(old, new)
    return paragraph


def _shortened(paragraph: str) -> str:
    """The paragraph cut after the sentence that reaches ``PROMPT_WORDS`` words (whole when shorter)."""
    words = 0
    for match in re.finditer(r"[^.!?]+[.!?]+\s*", paragraph):
        words += len(match.group().split())
        if words >= PROMPT_WORDS:
            return paragraph[: match.end()].strip()
    return paragraph


def wikitext_paragraphs() -> list[str]:
    """The eligible WikiText-2 valid paragraphs, in file order, as plain text: not a heading, ``MIN_WORDS`` to
    ``MAX_WORDS`` words, at most ``MAX_UNKNOWN`` removed rare words."""
    with gzip.open(BUILTIN_SOURCES["builtin:wikitext2-valid"], "rt", encoding="utf-8") as handle:
        lines = [line.strip() for line in handle]
    paragraphs = [
        line
        for line in lines
        if line
        and not line.startswith("=")
        and MIN_WORDS <= len(line.split()) <= MAX_WORDS
        and line.count("<unk>") <= MAX_UNKNOWN
    ]
    return [_shortened(_plain(p)) for p in paragraphs]


def builtin_prompts(source: str, count: int) -> list[list[dict[str, str]]]:
    """``count`` single-turn prompts of the builtin set ``source`` (the module docstring says how they are made;
    the held-out set has at most one per paragraph and instruction)."""
    require(source in PROMPT_SOURCES, f"prompts: unknown builtin prompt set {source!r}; one of {PROMPT_SOURCES}")
    paragraphs = wikitext_paragraphs()
    heldout = source == HELDOUT_PROMPTS
    pool = paragraphs[-HELDOUT_PARAGRAPHS:] if heldout else paragraphs[:-HELDOUT_PARAGRAPHS]
    if heldout:
        count = min(count, len(pool) * len(INSTRUCTIONS))
    prompts = []
    for k in range(count):
        instruction = INSTRUCTIONS[(k // len(pool) + k) % len(INSTRUCTIONS)]
        prompts.append([{"role": "user", "content": f"{instruction}\n\n{pool[k % len(pool)]}"}])
    return prompts


def prompt_of_row(row: dict, where: str) -> list[dict[str, str]]:
    """The prompt of one dataset row as messages: ``prompt`` (a string becomes one user turn, or messages) or
    ``messages`` up to their last user turn."""
    if "prompt" in row:
        prompt = row["prompt"]
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    require("messages" in row, f"{where}: a prompt row needs a 'prompt' or a 'messages' field")
    messages = list(row["messages"])
    users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
    require(users, f"{where}: its messages have no user turn to answer")
    return messages[: users[-1] + 1]
