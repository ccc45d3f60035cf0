"""Text sources, calibration windows and evaluation token streams.

A *source* is one of:

* ``builtin:wikitext2-valid`` / ``builtin:wikitext2-test``: real text shipped with dlp (see
  ``dlp/builtin_data/README.md``), so everything runs offline;
* a local ``.txt``/``.tokens``/``.raw`` file (one document per line) or ``.jsonl`` file (a ``text`` field);
* a Hugging Face dataset id, optionally ``id:config``, read when the hub is reachable.

Every source becomes one text that is tokenized once. A text file is taken as it is (newlines normalized to
``\\n``); the rows of a ``.jsonl`` file or a hub dataset are joined with ``"\\n\\n"``, as the standard WikiText-2
protocol does with the hub's rows (``"\\n\\n".join(test["text"])``). On the WikiText-2 raw test file shipped in
``shared/`` and in ``builtin:wikitext2-test`` (one paragraph per line, no blank lines) the file-as-is rule gives
SmolLM2-135M a dense perplexity of 29.53 over 64×512 windows, the project's reference figure.

Only as much of a source is read and tokenized as the windows need, so memory and time do not grow with the file
(``check_source`` alone streams a whole local file, in 1 MiB chunks, to check that it is UTF-8):

* consecutive windows (fine-tuning with ``train_max_windows``, evaluation with ``max_windows``) read a prefix of
  ``CHARS_PER_TOKEN`` = 8 characters per needed token, cut after its last line break, and double it until it
  tokenizes to ``TOKEN_MARGIN`` = 64 more tokens than needed; the tokens next to the cut, which a tokenizer may
  merge differently, are never used, so the windows are exactly those of the whole text;
* calibration windows are drawn from the first ``calibration_char_cap(nsamples, seqlen)`` = max(2 MiB,
  32 × nsamples × seqlen) characters of the text, cut after their last line break. A text no longer than that, such
  as ``builtin:wikitext2-valid`` (1.1 M characters), is read whole and gives the windows it always gave; a longer
  one is calibrated on its first part only.

A ``.jsonl`` row is read whole; a hub dataset is streamed row by row until the limit. Without ``max_windows`` the
whole text is read.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DlpError, require

_BUILTIN_DIR = Path(__file__).parent / "builtin_data"
BUILTIN_SOURCES = {
    "builtin:wikitext2-valid": _BUILTIN_DIR / "wikitext2.valid.tokens.gz",
    "builtin:wikitext2-test": _BUILTIN_DIR / "wikitext2.test.raw.gz",
}
TEXT_SUFFIXES = {".txt", ".tokens", ".raw"}


CHARS_PER_TOKEN = 8  # first guess of the characters a needed token takes (real text: about 4)
TOKEN_MARGIN = 64  # tokens read past those needed, never used: the cut may tokenize differently next to it
CALIBRATION_MIN_CHARS = 2 << 20  # 2 MiB: builtin:wikitext2-valid (1.1 M characters) stays whole; a character-level
# tokenizer's ids for it still fit in about 1 GB
CALIBRATION_CHARS_PER_TOKEN = 32  # about 8× the tokens the windows cover, so random windows rarely overlap
_CHUNK_BYTES = 1 << 20


def calibration_char_cap(nsamples: int, seqlen: int) -> int:
    """How many characters of a source the calibration windows are drawn from: max(2 MiB, 32 × nsamples × seqlen)."""
    return max(CALIBRATION_MIN_CHARS, CALIBRATION_CHARS_PER_TOKEN * nsamples * seqlen)


def read_text(
    source: str,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    max_chars: int | None = None,
) -> str:
    """The whole text of ``source``: a text file as it is, rows of jsonl/hub datasets joined with blank lines
    (``max_documents`` and ``max_chars`` stop a streamed hub dataset only; a local file is read whole)."""
    return _read_source(source, split, text_field, max_documents, max_chars, file_chars=None)[0]


def read_text_prefix(
    source: str, max_chars: int, split: str = "train", text_field: str = "text", max_documents: int | None = None
) -> tuple[str, bool]:
    """The start of ``source``'s text and whether it is the whole text. A text longer than ``max_chars`` characters
    is cut to its first ``max_chars``, then after their last line break (so the tokenizer sees whole lines); a hub
    dataset stops after the row that reaches ``max_chars`` or ``max_documents``, as :func:`read_text` does."""
    return _read_source(source, split, text_field, max_documents, max_chars, file_chars=max_chars)


def _read_source(
    source: str,
    split: str,
    text_field: str,
    max_documents: int | None,
    max_chars: int | None,
    file_chars: int | None,
) -> tuple[str, bool]:
    """(text, whole): a hub dataset streamed up to ``max_documents``/``max_chars``; a builtin or local file up to
    ``file_chars`` characters (None: whole), cut after its last line break when it is longer."""
    if source in BUILTIN_SOURCES:
        with gzip.open(BUILTIN_SOURCES[source], "rb") as handle:
            text, whole = _decode_prefix(handle, source, file_chars)
        return (text, True) if whole else (_cut_at_line(text), False)
    check_source(source, scan=False)  # the read below reports a non-UTF-8 byte itself
    path = Path(source).expanduser()
    if not path.exists():
        docs, whole = _read_hub(source, split, text_field, max_documents, max_chars)
        return "\n\n".join(docs), whole
    try:
        if path.suffix != ".jsonl":
            with path.open("rb") as handle:
                text, whole = _decode_prefix(handle, str(path), file_chars)
        else:
            docs, whole = _read_jsonl(path, text_field, file_chars)
            text = "\n\n".join(docs)
    except UnicodeDecodeError as exc:
        raise DlpError(
            f"data: {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start : exc.start + 1]!r})"
        )
    except OSError as exc:
        raise DlpError(f"data: cannot read {path} ({exc.strerror or type(exc).__name__})")
    return (text, True) if whole else (_cut_at_line(text[:file_chars]), False)


def _decode_prefix(handle, name: str, max_chars: int | None) -> tuple[str, bool]:
    """(text, whole): a binary file decoded as UTF-8 with universal newlines, as ``open(path, encoding="utf-8")``
    reads it, chunk by chunk until more than ``max_chars`` characters (truncated to them) or the end of the file:
    never the whole of a large file when a prefix is asked for."""
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    parts: list[str] = []
    chars = offset = 0
    try:
        while max_chars is None or chars <= max_chars:
            chunk = handle.read(_CHUNK_BYTES)
            parts.append(decoder.decode(chunk, final=not chunk))
            chars += len(parts[-1])
            if not chunk:
                return "".join(parts), True
            offset += len(chunk)
    except UnicodeDecodeError as exc:
        raise DlpError(
            f"data: {name} is not UTF-8 text (byte {offset + exc.start} is {exc.object[exc.start : exc.start + 1]!r})"
        )
    return "".join(parts)[:max_chars], False


def _cut_at_line(text: str) -> str:
    """A partial text cut after its last line break (kept whole when it has none: the token margin covers it)."""
    end = text.rfind("\n")
    return text[: end + 1] if end >= 0 else text


def check_source(source: str, field: str = "data", scan: bool = True) -> None:
    """The checks of a text source before any model loads: a known builtin name, a local file of a known kind that
    is UTF-8 text (``scan``: streamed through a decoder once; a path that does not exist is taken as a hub dataset
    id and can only be checked by reading it)."""
    require(
        not source.startswith("builtin:") or source in BUILTIN_SOURCES,
        f"{field}: data source {source!r} unknown; built-in sources: {sorted(BUILTIN_SOURCES)}",
    )
    path = Path(source).expanduser()
    if source in BUILTIN_SOURCES or not path.exists():
        return
    require(path.is_file(), f"{field}: {path} is a directory, not a text file")
    require(
        path.suffix == ".jsonl" or path.suffix in TEXT_SUFFIXES,
        f"{field}: {path} must end in .jsonl or one of {sorted(TEXT_SUFFIXES)}",
    )
    if not scan:
        return
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):  # streamed: a corpus may not fit twice in memory
                decoder.decode(chunk)
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise DlpError(
            f"{field}: {path} is not UTF-8 text (byte {offset + exc.start} is "
            f"{exc.object[exc.start : exc.start + 1]!r})"
        )
    except OSError as exc:
        raise DlpError(f"{field}: cannot read {path} ({exc.strerror or type(exc).__name__})")


def _read_jsonl(path: Path, text_field: str, max_chars: int | None = None) -> tuple[list[str], bool]:
    """(rows, whole): the ``text_field`` of each row, until the rows joined hold more than ``max_chars``
    characters (None: all rows; a row is read whole)."""
    docs: list[str] = []
    chars = -2  # the rows are joined with "\n\n"
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DlpError(f"data: {path}:{number} is not valid JSON ({exc.msg})")
            require(
                isinstance(record, dict) and text_field in record, f"data: {path}:{number} has no field {text_field!r}"
            )
            docs.append(str(record[text_field]))
            chars += len(docs[-1]) + 2
            if max_chars is not None and chars > max_chars:
                return docs, False
    return docs, True


def _read_hub(
    source: str, split: str, text_field: str, max_documents: int | None, max_chars: int | None
) -> tuple[list[str], bool]:
    """(rows, whole): a hub dataset's rows streamed until ``max_documents`` rows or ``max_chars`` characters (C4 is
    huge); whole when the stream ended first."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DlpError("data: reading a hub dataset needs the package datasets")
    name, _, config = source.partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
        docs, chars = [], 0
        for record in stream:
            docs.append(str(record[text_field]))
            chars += len(docs[-1]) + 2
            if (max_documents is not None and len(docs) >= max_documents) or (
                max_chars is not None and chars >= max_chars
            ):
                return docs, False
        return docs, True
    except Exception as exc:  # offline, unknown id, wrong split: all user-fixable
        raise DlpError(
            f"data: {source!r} is not a local file, a builtin source or a reachable hub dataset ({type(exc).__name__})"
        )


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once, returning a 1-D LongTensor of ids."""
    require(text.strip() != "", "data: the source holds no text")
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def load_token_stream(
    tokenizer, source: str, split: str = "train", min_tokens: int | None = None, text_field: str = "text"
) -> torch.Tensor:
    """``source``'s token ids: the whole text tokenized once, or with ``min_tokens`` its first ``min_tokens`` ids
    (all of them if the text holds fewer), exactly as the whole text gives them. Only a prefix of the text is read:
    ``CHARS_PER_TOKEN`` characters per token, doubled until it tokenizes to ``TOKEN_MARGIN`` more ids than needed,
    since the ids next to the cut may differ from the whole text's."""
    if min_tokens is None:
        return tokenize_text(tokenizer, read_text(source, split, text_field))
    chars = CHARS_PER_TOKEN * max(min_tokens, 1)
    while True:
        text, whole = read_text_prefix(source, chars, split, text_field)
        if whole or text.strip():  # a prefix of blank lines says nothing yet about the text
            ids = tokenize_text(tokenizer, text)
            if whole or ids.numel() >= min_tokens + TOKEN_MARGIN:
                return ids[:min_tokens].clone()  # the rest of the prefix's ids is freed with it
        chars *= 2


@dataclass(frozen=True)
class CalibrationSet:
    """``nsamples`` windows of ``seqlen`` tokens and a hash that identifies them (for mask metadata and caches)."""

    input_ids: torch.Tensor  # [nsamples, seqlen]
    source: str
    seed: int

    @property
    def sha256(self) -> str:
        return token_hash(self.input_ids)


def token_hash(ids: torch.Tensor) -> str:
    digest = hashlib.sha256(str(tuple(ids.shape)).encode())
    digest.update(ids.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def sample_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Draw ``nsamples`` random windows of ``seqlen`` tokens from a token stream (seeded, reproducible)."""
    require(nsamples >= 1 and seqlen >= 2, "calibration: nsamples must be >= 1 and seqlen >= 2")
    require(stream.numel() > seqlen, f"calibration: the text has {stream.numel()} tokens, fewer than seqlen={seqlen}")
    if stream.numel() < nsamples * seqlen:
        warnings.warn(
            f"calibration: the text has {stream.numel()} tokens, fewer than nsamples × seqlen = "
            f"{nsamples} × {seqlen}: the windows overlap, so they hold less information than their count "
            "suggests",
            stacklevel=2,
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


def load_calibration(
    tokenizer, source: str, nsamples: int, seqlen: int, seed: int, split: str = "train"
) -> CalibrationSet:
    """Calibration windows from the first ``calibration_char_cap(nsamples, seqlen)`` characters of ``source`` (its
    whole text when shorter, see the module docstring); a hub dataset is streamed for at most max(64, 8 × nsamples)
    rows."""
    budget = max(64, nsamples * 8)  # documents, for streamed hub datasets
    text, _ = read_text_prefix(source, calibration_char_cap(nsamples, seqlen), split, max_documents=budget)
    ids = sample_windows(tokenize_text(tokenizer, text), nsamples, seqlen, seed)
    return CalibrationSet(input_ids=ids, source=source, seed=seed)


def consecutive_windows(
    stream: torch.Tensor, seqlen: int, max_windows: int | None, purpose: str = "evaluation"
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start of the stream (the standard perplexity
    protocol; fine-tuning uses them too, so every token is seen once per epoch)."""
    count = stream.numel() // seqlen
    require(count >= 1, f"{purpose}: the text has {stream.numel()} tokens, fewer than seqlen={seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return stream[: count * seqlen].view(count, seqlen)


def load_training_windows(
    tokenizer, source: str, seqlen: int, split: str = "train", max_windows: int | None = None
) -> torch.Tensor:
    """Fine-tuning windows ``[n, seqlen]`` from the start of ``source``: all of the text's, or with ``max_windows``
    the first ones, read from only as much of the text as they need (:func:`load_token_stream`)."""
    stream = load_token_stream(tokenizer, source, split, seqlen * max_windows if max_windows else None)
    return consecutive_windows(stream, seqlen, max_windows, purpose="fine-tuning data")
