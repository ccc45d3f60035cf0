"""The recovery stage's data in trl's dataset formats: raw text, prompt-completion, and conversations.

``train_data`` names a source; its *format* is detected from its columns as trl's ``SFTTrainer`` detects it (or set
with ``train_format``):

* ``text``: a ``text`` column, or a raw text source (``builtin:…``, ``.txt``/``.tokens``/``.raw``). dlp cuts it into
  consecutive windows of ``max_length`` tokens with the loss on every token (:mod:`dlp.data`), as before: a window
  never pads, and windows are what trl's "wrapped" packing would make of the text anyway;
* ``prompt-completion``: ``prompt`` and ``completion`` columns, both strings or both lists of messages;
* ``messages``: a ``messages`` column of ``{"role", "content"}`` turns (ShareGPT's ``conversations`` of
  ``{"from", "value"}`` turns are converted by trl's ``maybe_convert_to_chatml``).

Row sources are local ``.jsonl``/``.json``/``.parquet`` files read with ``datasets``, hub dataset ids (``id`` or
``id:config``, when the hub is reachable), and ``selfgen:<prompts>``: the dense model's answers to a prompt set
(:mod:`dlp.prompts`, :mod:`dlp.selfgen`), conversational prompt-completion rows.

What trl does, unchanged: the chat template (``apply_chat_template``), EOS handling, tokenization, the completion
mask (``completion_only_loss``, on by default for prompt-completion), the assistant mask (``assistant_only_loss``,
via ``{% generation %}`` markers or trl's training templates), truncation, packing (``packing``,
``packing_strategy``) and the collator. What dlp does itself, and why: reading the files (so a bad file, an empty
one, a row without the needed fields or a turn with an unknown role is one line before any model loads, instead of
a traceback after pruning); refusing conversations for a tokenizer without a chat template and
``assistant_only_loss`` for a template neither marked nor patchable by trl (trl would fail only once training
starts); and the text windows above.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import (
    BUILTIN_SOURCES,
    TEXT_SUFFIXES,
    check_source,
    consecutive_windows,
    load_training_windows,
    tokenize_text,
)
from .errors import DlpError, require

TRAIN_FORMATS = ("auto", "text", "prompt-completion", "messages")
ROW_FILES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant", "tool")
SELFGEN_PREFIX = "selfgen:"


@dataclass
class TrainRows:
    """A row source read and checked: its format, whether its turns need a chat template, and its rows (None for
    text read as windows straight from the source)."""

    source: str
    format: str
    conversational: bool
    rows: list[dict[str, Any]] | None = None

    @property
    def windows(self) -> bool:
        return self.format == "text"


def is_selfgen(source: str) -> bool:
    return source.startswith(SELFGEN_PREFIX)


def selfgen_prompts_source(source: str) -> str:
    return source[len(SELFGEN_PREFIX) :]


def _is_text_source(source: str) -> bool:
    path = Path(source).expanduser()
    return source in BUILTIN_SOURCES or (path.is_file() and path.suffix in TEXT_SUFFIXES)


def _first_jsonl_row(path: Path, field: str) -> dict:
    """The first non-empty row of a ``.jsonl`` file (its keys say the format without reading the whole file)."""
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DlpError(f"{field}: {path}:{number} is not valid JSON ({exc.msg})")
                    require(isinstance(row, dict), f"{field}: {path}:{number} is not a JSON object")
                    return row
    except UnicodeDecodeError:
        raise DlpError(f"{field}: {path} is not UTF-8 text")
    except OSError as exc:
        raise DlpError(f"{field}: cannot read {path} ({exc.strerror or type(exc).__name__})")
    raise DlpError(f"{field}: {path} holds no rows")


def read_rows(source: str, split: str = "train", field: str = "train_data", max_rows: int = 0) -> list[dict]:
    """Every row (or the first ``max_rows``) of a local ``.jsonl``/``.json``/``.parquet`` file or a hub dataset,
    read with ``datasets``; any failure to read is one line naming the file."""
    import datasets

    path = Path(source).expanduser()
    bars_were_on = datasets.is_progress_bar_enabled()  # no bar for a quick read (nor before a one-line error)
    datasets.disable_progress_bars()
    try:
        if path.exists():
            require(path.suffix in ROW_FILES, f"{field}: {path} must end in {', '.join(ROW_FILES)} to hold rows")
            kind = ROW_FILES[path.suffix]
            dataset = datasets.load_dataset(kind, data_files=str(path), split="train")
            rows = dataset.select(range(min(max_rows, len(dataset)))) if max_rows else dataset
            rows = list(rows)
        else:
            name, _, config = source.partition(":")
            stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
            rows = list(stream.take(max_rows)) if max_rows else list(stream)
    except DlpError:
        raise
    except Exception as exc:  # pyarrow, json and hub errors alike: all about the file the user named
        if not path.exists():  # offline, unknown id, wrong split: all user-fixable
            raise DlpError(
                f"{field}: {source!r} is not a local file, a builtin source or a reachable hub dataset "
                f"({type(exc).__name__})"
            )
        message = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise DlpError(f"{field}: cannot read {path} as {ROW_FILES[path.suffix]} ({type(exc).__name__}: {message})")
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    require(rows, f"{field}: {source} holds no rows")
    return rows


def _first_hub_row(source: str, split: str, field: str) -> dict:
    """The first row of a hub dataset, streamed (its columns say the format)."""
    rows = read_rows(source, split, field, max_rows=1)
    return rows[0]


def detect_format(row: dict, source: str, train_format: str = "auto", field: str = "train_data") -> str:
    """The dataset format of a row, as trl detects it (``messages`` first, then ``prompt``/``completion``, then
    ``text``), or ``train_format`` when set and the row has its columns."""
    columns = set(row)
    found = (
        "messages"
        if columns & {"messages", "conversations"}
        else "prompt-completion"
        if {"prompt", "completion"} <= columns
        else "text"
        if "text" in columns
        else None
    )
    require(
        found is not None,
        f"{field}: {source} has neither a 'text' column, 'prompt' and 'completion' columns nor a 'messages' column "
        f"(columns: {', '.join(sorted(columns)) or 'none'})",
    )
    if train_format != "auto":
        needed = {"text": {"text"}, "prompt-completion": {"prompt", "completion"}, "messages": {"messages"}}
        require(
            needed[train_format] <= columns or (train_format == "messages" and "conversations" in columns),
            f"train_format: {train_format} needs the column(s) {', '.join(sorted(needed[train_format]))}; "
            f"{source} has {', '.join(sorted(columns))}",
        )
        return train_format
    return found


def check_messages(messages: Any, where: str) -> None:
    """A conversation is a non-empty list of ``{"role", "content"}`` turns with a known role and text content."""
    require(isinstance(messages, list) and messages, f"{where}: messages must be a non-empty list of turns")
    for number, turn in enumerate(messages, 1):
        require(isinstance(turn, dict), f"{where}: turn {number} is not an object with 'role' and 'content'")
        require("role" in turn, f"{where}: turn {number} has no 'role' (one of {', '.join(ROLES)})")
        require(
            turn["role"] in ROLES,
            f"{where}: turn {number} has role {turn['role']!r}; roles are {', '.join(ROLES)}",
        )
        require(
            isinstance(turn.get("content"), str) or turn["role"] == "assistant" and "tool_calls" in turn,
            f"{where}: turn {number} ({turn['role']}) has no text 'content'",
        )


def check_row(row: dict, fmt: str, where: str) -> bool:
    """One row of ``fmt`` is well formed; returns whether it is conversational (needs a chat template)."""
    if fmt == "text":
        require(isinstance(row.get("text"), str), f"{where}: 'text' must be a string")
        return False
    if fmt == "messages":
        check_messages(row["messages"], where)
        return True
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return False
    require(
        isinstance(prompt, list) and isinstance(completion, list),
        f"{where}: 'prompt' and 'completion' must both be strings or both lists of messages",
    )
    check_messages(prompt, f"{where} (prompt)")
    check_messages(completion, f"{where} (completion)")
    return True


def chatml_rows(rows: list[dict]) -> list[dict]:
    """ShareGPT rows (``conversations`` of ``{"from", "value"}``) as trl converts them, other rows unchanged."""
    if "conversations" not in rows[0]:
        return rows
    from trl.data_utils import maybe_convert_to_chatml

    return [maybe_convert_to_chatml(dict(row)) for row in rows]


def check_rows(rows: list[dict], fmt: str, source: str, field: str = "train_data") -> bool:
    """Every row checked; returns whether the rows are conversational. Columns other than the format's are dropped
    later (trl would keep extra columns such as ``tools`` and ``chat_template_kwargs``: they are kept too)."""
    conversational = None
    for number, row in enumerate(rows, 1):
        kind = check_row(row, fmt, f"{field}: {source} row {number}")
        require(
            conversational is None or kind == conversational,
            f"{field}: {source} row {number} mixes string and message rows; use one kind throughout",
        )
        conversational = kind
    return bool(conversational)


KEPT_COLUMNS = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "messages": ("messages",)}
EXTRA_COLUMNS = ("tools", "chat_template_kwargs")


def format_rows(rows: list[dict], fmt: str) -> list[dict]:
    """The rows with only the columns trl reads for ``fmt`` (another column of mixed types would stop ``datasets``
    from building the table)."""
    keep = KEPT_COLUMNS[fmt] + EXTRA_COLUMNS
    return [{key: row[key] for key in keep if key in row} for row in rows]


def check_chat_template(tokenizer, data: TrainRows, model: str, sft_args, field: str = "train_data") -> None:
    """Conversations need the tokenizer's chat template, and ``assistant_only_loss`` a template whose assistant
    turns trl can mark (``{% generation %}`` markers, or one of trl's training templates)."""
    require(
        not data.conversational or tokenizer.chat_template,
        f"{field}: {data.source} holds conversations, but the tokenizer of {model} has no chat template; use a chat "
        "model's tokenizer or give prompt/completion strings or text",
    )
    if getattr(sft_args, "assistant_only_loss", False):
        require(
            data.conversational,
            f"assistant_only_loss needs conversations (messages or message prompt/completion); {data.source} holds "
            f"{data.format} strings: set assistant_only_loss false",
        )
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        if not has_generation_markers(tokenizer.chat_template):
            try:
                get_training_chat_template(tokenizer)
            except ValueError:
                raise DlpError(
                    f"assistant_only_loss: the chat template of {model} has no {{% generation %}} markers and trl has "
                    "no training template for it; give prompt/completion rows (the loss is then on the completion "
                    "only) or set assistant_only_loss false"
                )


def load_rows_source(source: str, split: str, train_format: str, max_rows: int, field: str = "train_data") -> TrainRows:
    """A row or text source read and checked (no model needed): text sources stay unread, to become windows."""
    path = Path(source).expanduser()
    if source.startswith("builtin:") or path.suffix in TEXT_SUFFIXES or path.is_dir():
        check_source(source, field)  # a known builtin name, a file not a directory, UTF-8 text
    if _is_text_source(source):
        require(train_format in ("auto", "text"), f"train_format: {source} is raw text; set train_format text or auto")
        return TrainRows(source, "text", False)
    first = _first_jsonl_row(path, field) if path.suffix == ".jsonl" and path.is_file() else None
    if not path.exists():
        first = _first_hub_row(source, split, field)
    if first is not None and detect_format(first, source, train_format, field) == "text":
        return TrainRows(source, "text", False)  # streamed into windows, as before: a corpus is never read whole
    rows = chatml_rows(read_rows(source, split, field, max_rows))
    fmt = detect_format(rows[0], source, train_format, field)
    conversational = check_rows(rows, fmt, source, field)
    return TrainRows(source, fmt, conversational, format_rows(rows, fmt))


def text_windows(tokenizer, data: TrainRows, split: str, seqlen: int, max_windows: int) -> Any:
    """Consecutive windows of a text source ``[n, seqlen]``: streamed from a text file, ``.jsonl`` or hub dataset
    (:mod:`dlp.data`), or from the ``text`` of rows already read (``.json``/``.parquet``), joined as the
    ``.jsonl`` rows are."""
    if data.rows is None:
        return load_training_windows(tokenizer, data.source, seqlen, split, max_windows or None)
    stream = tokenize_text(tokenizer, "\n\n".join(row["text"] for row in data.rows))
    return consecutive_windows(stream, seqlen, max_windows or None, purpose="fine-tuning data")
