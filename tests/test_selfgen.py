"""Self-generated recovery data (dlp/selfgen.py): greedy generation against a hand-written decoding loop, answers
that do not depend on the batch, a killed generation that resumes to the same bytes (greedy and sampled), a cache of
another recipe replaced without touching the user's files, the model digest, settings errors, and trl's row format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_chat_tokenizer, tiny_model
from dlp import selfgen
from dlp.errors import DlpError
from dlp.selfgen import (
    GenerationSettings,
    answer_rows,
    cache_complete,
    cache_key,
    cached_answers,
    generate_batch,
    generate_ids,
    model_digest,
)

EOS = 96  # <|im_end|> in tiny_chat_tokenizer: EOS and pad
WORDS = ["why", "is", "the", "sky", "blue", "name", "a", "prime", "sort", "list", "of", "cats", "say", "hi"]


def make_prompts(count: int = 40) -> list[list[dict]]:
    """``count`` short chat prompts of different lengths (so batches are left-padded), some with a system turn."""
    gen = torch.Generator().manual_seed(1)
    prompts = []
    for i in range(count):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (1 + i % 7,), generator=gen)]
        prompt = [{"role": "user", "content": " ".join(words)}]
        prompts.append([{"role": "system", "content": "be brief"}] + prompt if i % 5 == 0 else prompt)
    return prompts


GREEDY = GenerationSettings(max_new_tokens=8, batch_size=4)
SAMPLED = GenerationSettings(max_new_tokens=8, batch_size=4, sampling="sample", temperature=0.9, seed=3)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 16 prompts, so 40 prompts make three (the last one short)."""
    monkeypatch.setattr(selfgen, "SHARD_PROMPTS", 16)


def hand_greedy(model, tokenizer, prompt, max_new_tokens: int) -> list[int]:
    """Greedy decoding without generate(): the whole sequence through the model at each step, argmax, stop at EOS."""
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return new


def test_greedy_generation_is_argmax_decoding_by_hand(model, tokenizer):
    prompts = make_prompts(6)
    settings = GenerationSettings(max_new_tokens=12, batch_size=3)
    expected = [hand_greedy(model, tokenizer, prompt, 12) for prompt in prompts]
    assert generate_ids(model, tokenizer, prompts, settings) == expected
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected]
    assert generate_batch(model, tokenizer, prompts, settings) == texts
    assert tokenizer.padding_side == "right"  # untouched


def test_answers_stop_at_eos_and_empty_answers_are_counted(model, tmp_path):
    """The random model never says EOS: make one of the tokens it does say the EOS, so some answers stop early
    (a token in some answers but not all), or, with the first token of an answer, at once (empty answers)."""
    prompts = make_prompts(8)
    outputs = [hand_greedy(model, tiny_chat_tokenizer(), prompt, 8) for prompt in prompts]
    some = sorted({t for out in outputs for t in out if t < 95 and not all(t in other for other in outputs)})
    tokenizer = tiny_chat_tokenizer()
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(some[0])
    expected = [hand_greedy(model, tokenizer, prompt, 8) for prompt in prompts]
    assert {len(ids) < 8 for ids in expected} == {True, False}
    assert generate_ids(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8, batch_size=3)) == expected

    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(outputs[0][0])
    answers = cached_answers(model, tokenizer, prompts, tmp_path, GREEDY, "digest")
    empty = sum(not out or out[0] == outputs[0][0] for out in outputs)
    assert answers[0] == "" and sum(not answer for answer in answers) == empty
    assert json.loads((tmp_path / "manifest.json").read_text())["empty_answers"] == empty


def test_greedy_answers_do_not_depend_on_the_batch(model, tokenizer):
    prompts = make_prompts(12)
    one = generate_ids(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8, batch_size=1))
    four = generate_ids(model, tokenizer, prompts, GenerationSettings(max_new_tokens=8, batch_size=4))
    assert len({len(p[-1]["content"]) for p in prompts}) > 1  # the batches of four are padded
    assert one == four


def test_answers_ignore_the_checkpoints_generation_config(model, tokenizer):
    """The key does not cover generation_config.json, so its values (a repetition penalty, top_k, other EOS ids,
    sampling) must not reach the answers; the model keeps its own config."""
    prompts = make_prompts(6)
    plain = generate_ids(model, tokenizer, prompts, GREEDY)
    other = tiny_model("llama")
    config = other.generation_config
    config.update(repetition_penalty=3.0, do_sample=True, top_k=2, eos_token_id=[plain[0][1]], min_new_tokens=2)
    assert generate_ids(other, tokenizer, prompts, GREEDY) == plain
    assert other.generation_config is config


def shard_bytes(cache_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(cache_dir.glob("shard-*.jsonl"))}


def counting(monkeypatch, die_on_call: int | None = None) -> list[int]:
    """Count generate_batch calls (one per shard); with ``die_on_call``, that call raises (a killed run)."""
    calls: list[int] = []
    real = selfgen.generate_batch

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == die_on_call:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(selfgen, "generate_batch", wrapped)
    return calls


@pytest.mark.parametrize("settings", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_killed_generation_resumes_to_the_same_data(model, tokenizer, tmp_path, monkeypatch, small_shards, settings):
    prompts, digest = make_prompts(40), model_digest(model)
    whole = cached_answers(model, tokenizer, prompts, tmp_path / "whole", settings, digest)
    killed = tmp_path / "killed"

    counting(monkeypatch, die_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        cached_answers(model, tokenizer, prompts, killed, settings, digest)
    key = cache_key(prompts, digest, tokenizer, settings)
    assert sorted(shard_bytes(killed)) == ["shard-00000.jsonl"] and not cache_complete(killed, key)

    torch.manual_seed(12345)  # another global random state: a resumed run must not depend on it
    state = torch.get_rng_state()
    calls = counting(monkeypatch)
    resumed = cached_answers(model, tokenizer, prompts, killed, settings, digest)
    assert len(calls) == 2  # only the two missing shards
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is left alone
    assert resumed == whole and len(resumed) == 40
    assert shard_bytes(killed) == shard_bytes(tmp_path / "whole") and len(shard_bytes(killed)) == 3
    assert (killed / "manifest.json").read_bytes() == (tmp_path / "whole" / "manifest.json").read_bytes()
    assert cache_complete(killed, key)

    again = cached_answers(model, tokenizer, prompts, killed, settings, digest)
    assert again == whole and len(calls) == 2  # complete: nothing generated
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["key"] == key and manifest["prompts"] == 40 and manifest["shards"] == 3
    assert manifest["empty_answers"] == sum(not answer for answer in whole)
    first_line = (killed / "shard-00000.jsonl").read_text().splitlines()[0]
    assert json.loads(first_line) == {"answer": whole[0]}


def test_sampling_is_seeded_and_differs_from_greedy(model, tokenizer):
    prompts = make_prompts(8)
    torch.manual_seed(0)
    sampled = generate_batch(model, tokenizer, prompts, SAMPLED)
    torch.manual_seed(0)
    assert generate_batch(model, tokenizer, prompts, SAMPLED) == sampled
    assert sampled != generate_batch(model, tokenizer, prompts, GREEDY)


@pytest.mark.parametrize(
    "change",
    [{"settings": GenerationSettings(max_new_tokens=5, batch_size=4)}, {"digest": "another model"}],
    ids=["settings", "model"],
)
def test_another_key_replaces_the_cache_and_keeps_the_users_files(
    model, tokenizer, tmp_path, monkeypatch, small_shards, change
):
    prompts, digest = make_prompts(40), model_digest(model)
    cached_answers(model, tokenizer, prompts, tmp_path, GREEDY, digest)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "shard-notes.txt").write_text("mine too")
    assert len(shard_bytes(tmp_path)) == 3

    calls = counting(monkeypatch, die_on_call=1)
    settings, other_digest = change.get("settings", GREEDY), change.get("digest", digest)
    with pytest.raises(KeyboardInterrupt):  # dies before its first shard: the old shards must be gone by then
        cached_answers(model, tokenizer, prompts, tmp_path, settings, other_digest)
    assert shard_bytes(tmp_path) == {} and len(calls) == 1
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "shard-notes.txt").read_text() == "mine too"

    calls = counting(monkeypatch)
    cached_answers(model, tokenizer, prompts, tmp_path, settings, other_digest)
    assert len(calls) == 3 and cache_complete(tmp_path, cache_key(prompts, other_digest, tokenizer, settings))
    assert not cache_complete(tmp_path, cache_key(prompts, digest, tokenizer, GREEDY))


def test_greedy_key_ignores_the_sampling_fields(tokenizer):
    prompts = make_prompts(3)
    key = cache_key(prompts, "d", tokenizer, GREEDY)
    assert cache_key(prompts, "d", tokenizer, GenerationSettings(max_new_tokens=8, batch_size=4, seed=9)) == key
    for other in (SAMPLED, GenerationSettings(max_new_tokens=8, batch_size=2)):
        assert cache_key(prompts, "d", tokenizer, other) != key
    assert cache_key(prompts[:2], "d", tokenizer, GREEDY) != key
    assert cache_key(prompts, "e", tokenizer, GREEDY) != key


def test_model_digest_sees_one_weight_and_nothing_else(model):
    digest = model_digest(model)
    assert model_digest(tiny_model("llama")) == digest  # same weights, another object
    other = tiny_model("llama")
    with torch.no_grad():
        weight = other.model.layers[1].mlp.down_proj.weight
        weight[3, 5] += 1e-3
        assert model_digest(other) != digest
        weight[3, 5] -= 1e-3
        weight[3, 5] = model.model.layers[1].mlp.down_proj.weight[3, 5]  # exactly back (float rounding)
    assert model_digest(other) == digest
    assert model_digest(tiny_model("llama").to(torch.bfloat16)) != digest  # bfloat16 hashes too (no numpy dtype)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sampling": "beam"}, "selfgen_sampling"),
        ({"max_new_tokens": 0}, "selfgen_max_new_tokens"),
        ({"batch_size": 0}, "selfgen_batch_size"),
        ({"temperature": 0.0}, "selfgen_temperature"),
        ({"top_p": 0.0}, "selfgen_top_p"),
        ({"top_p": 1.5}, "selfgen_top_p"),
        ({"seed": 1.5}, "selfgen_seed"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(DlpError, match=field):
        GenerationSettings(**kwargs)


def test_bad_sampling_lists_the_allowed_values():
    with pytest.raises(DlpError, match=r"selfgen_sampling must be one of greedy, sample \(got 'x'\)"):
        GenerationSettings(sampling="x")


def test_answer_rows_are_trl_conversational_prompt_completion_rows(tokenizer):
    from trl.data_utils import apply_chat_template, is_conversational

    prompts = make_prompts(2)
    rows = answer_rows(prompts, ["blue, mostly", ""])
    assert rows[0] == {"prompt": prompts[0], "completion": [{"role": "assistant", "content": "blue, mostly"}]}
    assert all(is_conversational(row) for row in rows)
    rendered = apply_chat_template(rows[0], tokenizer)  # what trl's SFT trainer trains on: the answer after the prompt
    full = tokenizer.apply_chat_template(prompts[0] + rows[0]["completion"], tokenize=False)
    assert rendered["prompt"] + rendered["completion"] == full
    with pytest.raises(ValueError):
        answer_rows(prompts, ["one answer"])
