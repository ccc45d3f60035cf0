"""Bounded reading of large sources (issue 26): only as much text as the windows need is read and tokenized, and a
text under the limits gives exactly the token ids of the whole text tokenized once, as before."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_tokenizer
from dlp import data
from dlp.errors import DlpError
from dlp.data import (
    calibration_char_cap,
    consecutive_windows,
    load_calibration,
    load_token_stream,
    load_training_windows,
    sample_windows,
    tokenize_text,
)

_WORDS = "the of and lobster river castle was a in to is by station line album song film game played early".split()


def _corpus(chars: int, seed: int) -> str:
    """WikiText-like lines: headings, blank lines, sentences with and without a leading space."""
    rng, lines, size = random.Random(seed), [], 0
    while size < chars:
        kind = rng.random()
        if kind < 0.1:
            line = ""
        elif kind < 0.2:
            line = f" = {rng.choice(_WORDS).title()} {rng.randint(1, 99)} = "
        else:
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 30)))
            line = (" " if rng.random() < 0.5 else "") + words + " ."
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A tiny BPE without pre-tokenization, whose merges cross line breaks ('.\\n '): a prefix cut after a line
    break tokenizes differently next to the cut than the whole text does, which the token margin must absorb."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    lines = _corpus(60_000, 0).split("\n")
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"], show_progress=False)
    backend.train_from_iterator(["\n".join(lines[i : i + 4]) + "\n" for i in range(0, len(lines), 4)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def _whole_ids(tokenizer, path: Path) -> torch.Tensor:
    """The pre-issue-26 path: the whole file read at once and tokenized once."""
    return tokenize_text(tokenizer, path.read_text(encoding="utf-8").replace("\r\n", "\n"))


def test_small_file_gives_the_whole_text_ids(tmp_path, bpe_tokenizer, monkeypatch):
    """Under the limits nothing changes: calibration and training windows are those of the whole text, also with
    CRLF/CR line ends and multi-byte characters split across read chunks."""
    path = tmp_path / "small.txt"
    path.write_bytes((_corpus(50_000, 1).replace(" .\n", " é中 .\r\n", 40) + "x\r\ry\r").encode("utf-8"))
    monkeypatch.setattr(data, "_CHUNK_BYTES", 4093)  # odd-sized chunks: boundaries inside characters and CRLFs
    whole = _whole_ids(bpe_tokenizer, path)
    assert data.read_text(str(path)) == path.read_text(encoding="utf-8")
    for seed in (0, 7):
        calib = load_calibration(bpe_tokenizer, str(path), nsamples=8, seqlen=64, seed=seed)
        assert torch.equal(calib.input_ids, sample_windows(whole, 8, 64, seed))
    for seqlen, max_windows in [(64, 2), (100, 7), (64, None), (32, 10_000)]:
        windows = load_training_windows(bpe_tokenizer, str(path), seqlen, max_windows=max_windows)
        assert torch.equal(windows, consecutive_windows(whole, seqlen, max_windows))


def test_decoding_in_chunks_reads_the_file_as_open_does(tmp_path, monkeypatch):
    text = "a\r\nb\rc\né中\r\n\r\n𝄞 end\r"
    (tmp_path / "t.raw").write_bytes(text.encode("utf-8"))
    for chunk in (1, 2, 3, 5, 4093):
        monkeypatch.setattr(data, "_CHUNK_BYTES", chunk)
        assert data.read_text(str(tmp_path / "t.raw")) == (tmp_path / "t.raw").read_text(encoding="utf-8")
        assert data.read_text_prefix(str(tmp_path / "t.raw"), 8) == ("a\nb\nc\n", False)  # cut after a line
    (tmp_path / "bad.txt").write_bytes(b"0123456789\xff tail")
    monkeypatch.setattr(data, "_CHUNK_BYTES", 3)
    with pytest.raises(DlpError, match=r"bad.txt is not UTF-8 text \(byte 10 is b'\\xff'\)"):
        data.read_text(str(tmp_path / "bad.txt"))


def test_large_file_consecutive_windows_are_the_whole_text_windows(tmp_path, bpe_tokenizer, monkeypatch):
    """Training and evaluation windows read a prefix only, yet equal the whole text's, at every length tried."""
    path = tmp_path / "large.txt"
    path.write_text(_corpus(600_000, 2), encoding="utf-8")
    monkeypatch.setattr(data, "_CHUNK_BYTES", 1 << 16)
    whole = _whole_ids(bpe_tokenizer, path)
    prefixes: list[int] = []
    read_prefix = data.read_text_prefix
    monkeypatch.setattr(data, "read_text_prefix", lambda *a, **k: _record(prefixes, read_prefix(*a, **k)))
    rng = random.Random(3)
    for seqlen, max_windows in [(64, 2), (512, 3), *((rng.randint(2, 300), rng.randint(1, 40)) for _ in range(30))]:
        windows = load_training_windows(bpe_tokenizer, str(path), seqlen, max_windows=max_windows)
        assert torch.equal(windows, consecutive_windows(whole, seqlen, max_windows)), (seqlen, max_windows)
        # evaluation (dlp.evaluate.perplexity with max_windows): the same stream, split "test"
        stream = load_token_stream(bpe_tokenizer, str(path), "test", seqlen * max_windows)
        assert torch.equal(consecutive_windows(stream, seqlen, max_windows), windows)
    assert max(prefixes) < 600_000 // 4  # never the whole file for these windows


def test_ids_next_to_the_cut_are_never_used(tmp_path, bpe_tokenizer, monkeypatch):
    """Where a prefix tokenizes to just about the ids needed, its last ids differ from the whole text's ('.\\n'
    where the text goes on with '.\\n '): the token margin makes the prefix grow past them."""
    path = tmp_path / "cut.txt"
    path.write_text(_corpus(100_000, 2), encoding="utf-8")
    whole = _whole_ids(bpe_tokenizer, path)
    monkeypatch.setattr(data, "CHARS_PER_TOKEN", 7)  # about this BPE's characters per token: prefixes end near n
    traps = []
    for needed in range(50, 400):
        ids = tokenize_text(bpe_tokenizer, data.read_text_prefix(str(path), 7 * needed)[0])
        if ids.numel() >= needed and not torch.equal(ids[:needed], whole[:needed]):
            traps.append(needed)
    assert len(traps) >= 3  # the case this test is about does occur with this tokenizer and text
    for needed in traps:
        assert torch.equal(load_token_stream(bpe_tokenizer, str(path), min_tokens=needed), whole[:needed]), needed


def _record(lengths: list[int], result: tuple[str, bool]) -> tuple[str, bool]:
    lengths.append(len(result[0]))
    return result


def test_a_short_first_prefix_is_doubled_until_it_holds_the_margin(tmp_path, monkeypatch):
    path = tmp_path / "lines.txt"
    path.write_text(_corpus(100_000, 4), encoding="utf-8")
    tokenizer = tiny_tokenizer()
    whole = _whole_ids(tokenizer, path)
    monkeypatch.setattr(data, "CHARS_PER_TOKEN", 1)  # the first prefix is always short of the margin
    prefixes: list[int] = []
    read_prefix = data.read_text_prefix
    monkeypatch.setattr(data, "read_text_prefix", lambda *a, **k: _record(prefixes, read_prefix(*a, **k)))
    assert torch.equal(load_token_stream(tokenizer, str(path), min_tokens=5000), whole[:5000])
    assert len(prefixes) >= 2 and prefixes == sorted(prefixes)
    assert torch.equal(load_token_stream(tokenizer, str(path), min_tokens=10**9), whole)  # the file ends first


def test_large_file_calibration_is_drawn_from_the_capped_prefix(tmp_path, bpe_tokenizer, monkeypatch):
    path = tmp_path / "large.tokens"
    text = _corpus(300_000, 5)
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(data, "CALIBRATION_MIN_CHARS", 100_000)  # the 2 MiB floor, scaled to the test
    cap = calibration_char_cap(4, 32)
    assert cap == 100_000 and calibration_char_cap(128, 2048) == 32 * 128 * 2048
    prefix = text[:cap][: text[:cap].rfind("\n") + 1]
    expected = sample_windows(tokenize_text(bpe_tokenizer, prefix), 4, 32, seed=11)
    calib = load_calibration(bpe_tokenizer, str(path), nsamples=4, seqlen=32, seed=11)
    assert torch.equal(calib.input_ids, expected)
    assert not torch.equal(calib.input_ids, sample_windows(_whole_ids(bpe_tokenizer, path), 4, 32, seed=11))
    assert load_calibration(bpe_tokenizer, str(path), 4, 32, seed=11).sha256 == calib.sha256  # deterministic
    assert load_calibration(bpe_tokenizer, str(path), 4, 32, seed=12).sha256 != calib.sha256


def test_builtin_validation_text_is_under_the_calibration_cap():
    """The reference masks calibrate on builtin:wikitext2-valid: it must stay whole at any nsamples × seqlen."""
    assert len(data.read_text("builtin:wikitext2-valid")) < data.CALIBRATION_MIN_CHARS
    assert data.read_text_prefix("builtin:wikitext2-valid", calibration_char_cap(1, 2))[1]


def test_jsonl_reads_only_the_rows_the_windows_need(tmp_path, bpe_tokenizer, monkeypatch):
    rows = [{"text": _corpus(rng_size, seed), "id": seed} for seed, rng_size in enumerate([800, 3000, 200] * 400)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    whole = tokenize_text(bpe_tokenizer, "\n\n".join(row["text"] for row in rows))
    counts: list[int] = []
    read_jsonl = data._read_jsonl

    def counting(*args, **kwargs):
        docs, complete = read_jsonl(*args, **kwargs)
        counts.append(len(docs))
        return docs, complete

    monkeypatch.setattr(data, "_read_jsonl", counting)
    windows = load_training_windows(bpe_tokenizer, str(path), 128, max_windows=4)
    assert torch.equal(windows, consecutive_windows(whole, 128, 4))
    assert max(counts) < len(rows) // 20
    monkeypatch.setattr(data, "CALIBRATION_MIN_CHARS", 50_000)
    counts.clear()
    load_calibration(bpe_tokenizer, str(path), nsamples=2, seqlen=32, seed=0)
    assert counts and max(counts) < len(rows) // 5


_MEASURE = """
import json, resource, sys, time
from conftest import tiny_tokenizer
from dlp import data
read_bytes = []
decode = data._decode_prefix
class Counting:
    def __init__(self, handle): self.handle = handle
    def read(self, n):
        chunk = self.handle.read(n); read_bytes.append(len(chunk)); return chunk
data._decode_prefix = lambda handle, name, max_chars: decode(Counting(handle), name, max_chars)
tokenizer = tiny_tokenizer()
tokenizer("warm up", verbose=False)
base, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
calib = data.load_calibration(tokenizer, sys.argv[1], nsamples=2, seqlen=32, seed=0)
calib_bytes = sum(read_bytes)
windows = data.load_training_windows(tokenizer, sys.argv[1], 32, max_windows=2)
seconds, peak = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
scale = 1 if sys.platform == "darwin" else 1024
print(json.dumps({"seconds": seconds, "growth": (peak - base) * scale, "calib_bytes": calib_bytes,
                  "train_bytes": sum(read_bytes) - calib_bytes, "shapes": [list(calib.input_ids.shape),
                  list(windows.shape)]}))
"""


def test_a_30_mb_file_is_read_only_as_far_as_the_windows_need(tmp_path):
    """Issue 26: a 2×32-token run on a 30 MB text took 5.5-5.9 GB and a minute or more, tokenizing it all. Now it
    reads the calibration cap (2 MiB) and a few KB for the training windows; its memory does not depend on the
    file (measured in a fresh process, so earlier tests' peaks do not hide it)."""
    block = _corpus(1 << 16, 6)
    path = tmp_path / "big.txt"
    with path.open("w", encoding="utf-8") as handle:
        for number in range(30_000_000 // len(block) + 1):
            handle.write(f" = Part {number} =\n{block}")
    assert path.stat().st_size > 30_000_000
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["shapes"] == [[2, 32], [2, 32]]
    chunk = data._CHUNK_BYTES
    assert measured["calib_bytes"] <= data.CALIBRATION_MIN_CHARS + chunk  # ASCII: a character is a byte
    assert measured["train_bytes"] <= chunk
    # the whole file took 11 GB and 110-150 s here (character-level ids); a 4 MiB prefix took 1.7 GB and 7 s
    assert measured["growth"] < 3 << 29, measured
    assert measured["seconds"] < 60, measured
