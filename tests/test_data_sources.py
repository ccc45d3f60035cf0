"""Hub datasets (simulated: no network here), builtin text, and the perplexity protocol on a hand example."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from dlp.data import BUILTIN_SOURCES, load_calibration, load_training_windows, read_text
from dlp.errors import DlpError
from dlp.evaluate import perplexity


class _CharTokenizer:
    def __call__(self, text, **_kwargs):
        return {"input_ids": [ord(c) % 64 for c in text]}


def test_hub_dataset_is_streamed_and_truncated(monkeypatch):
    calls = {}

    def load_dataset(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return iter({"text": f"document {i} " * 20} for i in range(10_000))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    calib = load_calibration(_CharTokenizer(), "allenai/c4:en", nsamples=4, seqlen=32, seed=0)
    assert calls == {"name": "allenai/c4", "config": "en", "split": "train", "streaming": True}
    assert calib.input_ids.shape == (4, 32)


def test_training_windows_stream_only_enough_of_a_hub_dataset(monkeypatch):
    """C4 is far too large to read whole: with train_max_windows the stream stops at about 8 chars per token."""
    served = []

    def load_dataset(name, config, split, streaming):
        def rows():
            for i in range(100_000):
                served.append(i)
                yield {"text": "x" * 98}

        return rows()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    windows = load_training_windows(_CharTokenizer(), "allenai/c4:en", seqlen=50, split="validation", max_windows=3)
    assert windows.shape == (3, 50)
    assert len(served) == 12  # 12 rows × 100 chars ≥ 8 × 50 × 3 = 1,200 chars
    assert windows.flatten().tolist()[:100] == [ord("x") % 64] * 98 + [ord("\n") % 64] * 2


def test_unreachable_hub_is_a_user_error(monkeypatch):
    def load_dataset(*_args, **_kwargs):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DlpError, match="not a local file, a builtin source or a reachable hub dataset"):
        read_text("someone/dataset")


def test_builtin_sources_are_the_wikitext2_splits():
    import hashlib

    valid = read_text("builtin:wikitext2-valid")
    test = read_text("builtin:wikitext2-test")
    assert set(BUILTIN_SOURCES) == {"builtin:wikitext2-valid", "builtin:wikitext2-test"}
    assert test.startswith(" = Robert Boulter = \n Robert Boulter is") and valid.count("\n") == 3760
    # the shipped file is the raw test split byte for byte (CRLF line ends in the original)
    assert (
        hashlib.sha256(test.replace("\n", "\r\n").encode()).hexdigest()
        == "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
    )


def test_text_files_are_read_as_they_are_and_rows_joined_with_blank_lines(tmp_path):
    text = tmp_path / "a.txt"
    text.write_bytes(b"first line\r\nsecond\r\n")
    assert read_text(str(text)) == "first line\nsecond\n"
    rows = tmp_path / "a.jsonl"
    rows.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_text(str(rows)) == "one\n\ntwo"
    (tmp_path / "b.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DlpError, match="has no field 'text'"):
        read_text(str(tmp_path / "b.jsonl"))
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(DlpError, match="must end in .jsonl"):
        read_text(str(tmp_path / "c.csv"))


class _Uniform(torch.nn.Module):
    """Predicts a uniform distribution over V tokens: perplexity must be exactly V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab) + self.anchor
        return types.SimpleNamespace(logits=logits)


def test_perplexity_protocol_on_a_hand_case(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh\n" * 50)
    ppl = perplexity(_Uniform(64), _CharTokenizer(), str(text), seqlen=16, max_windows=5)
    assert ppl.value == pytest.approx(64.0, rel=1e-6)
    assert (ppl.windows, ppl.seqlen, ppl.tokens) == (5, 16, 5 * 15)
    whole = perplexity(_Uniform(64), _CharTokenizer(), str(text), seqlen=16, max_windows=None)
    # 50 lines of 9 characters: 450 characters -> 28 full windows of 16
    assert whole.windows == 450 // 16 and math.isclose(whole.value, 64.0, rel_tol=1e-6)
