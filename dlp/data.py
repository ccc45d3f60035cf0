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
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
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
_TEXT_SUFFIXES = {".txt", ".tokens", ".raw"}


def read_text(
    source: str,
    split: str = "train",
    text_field: str = "text",
    max_documents: int | None = None,
    max_chars: int | None = None,
) -> str:
    """The whole text of ``source``: a text file as it is, rows of jsonl/hub datasets joined with blank lines."""
    if source in BUILTIN_SOURCES:
        with gzip.open(BUILTIN_SOURCES[source], "rt", encoding="utf-8") as handle:
            return handle.read()
    check_source(source, scan=False)  # the read below reports a non-UTF-8 byte itself
    path = Path(source).expanduser()
    try:
        if path.exists() and path.suffix != ".jsonl":
            return path.read_text(encoding="utf-8").replace("\r\n", "\n")
        docs = (
            _read_jsonl(path, text_field)
            if path.exists()
            else _read_hub(source, split, text_field, max_documents, max_chars)
        )
    except UnicodeDecodeError as exc:
        raise DlpError(
            f"data: {path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start : exc.start + 1]!r})"
        )
    except OSError as exc:
        raise DlpError(f"data: cannot read {path} ({exc.strerror or type(exc).__name__})")
    return "\n\n".join(docs)


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
        path.suffix == ".jsonl" or path.suffix in _TEXT_SUFFIXES,
        f"{field}: {path} must end in .jsonl or one of {sorted(_TEXT_SUFFIXES)}",
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


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
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
    return docs


def _read_hub(source: str, split: str, text_field: str, max_documents: int | None, max_chars: int | None) -> list[str]:
    """Stream a hub dataset's rows until ``max_documents`` rows or ``max_chars`` characters (C4 is huge)."""
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
                break
        return docs
    except Exception as exc:  # offline, unknown id, wrong split: all user-fixable
        raise DlpError(
            f"data: {source!r} is not a local file, a builtin source or a reachable hub dataset ({type(exc).__name__})"
        )


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once, returning a 1-D LongTensor of ids."""
    require(text.strip() != "", "data: the source holds no text")
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


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
    """Calibration windows from ``source``. For hub datasets only enough documents for the windows are read."""
    budget = max(64, nsamples * 8)  # documents, for streamed hub datasets
    text = read_text(source, split=split, max_documents=budget)
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
    """Fine-tuning windows ``[n, seqlen]`` of ``source`` (the whole text, tokenized once). With ``max_windows``
    a hub dataset is streamed only until it holds enough text (about 8 characters per token, a safe margin)."""
    text = read_text(source, split=split, max_chars=8 * seqlen * max_windows if max_windows else None)
    return consecutive_windows(tokenize_text(tokenizer, text), seqlen, max_windows, purpose="fine-tuning data")
