"""Chat evaluation: the answer's ids by hand, the NLL and the greedy match against plain unbatched loops, the
dense model scoring 1.00 on its own greedy answers, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_chat_tokenizer, tiny_model
from dlp.chat_eval import MATCH_TOKENS, AnswerScores, answer_scores, answer_token_ids
from dlp.errors import DlpError

PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a color?"}],
    [{"role": "user", "content": "2+2"}],
]
ANSWERS = ["yo", "Blue, mostly.", "4"]


def ids_of(text: str) -> list[int]:
    """The character-level tokenizer's ids: printable ASCII character c is id ord(c) - 32."""
    return [ord(c) - 32 for c in text]


def conversation_logits(model, ids: list[int]) -> torch.Tensor:
    """One unbatched, unpadded forward: the reference the batched scoring is checked against."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def characters_only(model, penalty: float = 100.0):
    """``model`` with a bias of −``penalty`` on its output layer for every id that does not survive decode →
    re-encode as itself: space (the template may abut it), ``<unk>``, the special tokens 96/97 and the ids 98..127
    past the tokenizer's vocabulary. The model's own unrestricted argmax then picks characters '!'..'~' only, so a
    greedy answer decoded to a string tokenizes back to the very ids it was generated as, and answer_scores' plain
    argmax sees the same choices the generation loop made. The tiny random model's logits stay within a few units,
    so 100 rules those ids out, and the closing <|im_end|> of an answer still has a finite NLL (about 100)."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight.data.copy_(old.weight.data)
    head.bias.data.fill_(-penalty)
    head.bias.data[1:95] = 0.0
    model.lm_head = head
    return model


def greedy_answer(model, tokenizer, prompt: list[dict], length: int) -> str:
    """A plain argmax loop of ``length`` tokens from the prompt's ids, decoded: the dense model's greedy answer."""
    ids, start = answer_token_ids(tokenizer, prompt, "")
    ids = ids[:start]
    for _ in range(length):
        ids.append(int(conversation_logits(model, ids)[-1].argmax()))
    answer = tokenizer.decode(ids[start:])
    assert ids_of(answer) == ids[start:]  # the round trip the bias above guarantees
    return answer


def test_answer_token_ids_of_a_hand_checked_conversation():
    # <|im_start|>user hi<|im_end|><|im_start|>assistant yo<|im_end|>
    prompt = [97] + ids_of("user hi") + [96] + [97] + ids_of("assistant ")
    expected = prompt + ids_of("yo") + [96]
    ids, start = answer_token_ids(tiny_chat_tokenizer(), [{"role": "user", "content": "hi"}], "yo")
    assert ids == expected
    assert start == len(prompt) == 20
    assert ids[start:] == [89, 79, 96]


def test_answer_token_ids_match_trl_tokenization():
    """The same split as trl's own tokenization of a conversational prompt-completion example, where it has it."""
    data_utils = pytest.importorskip("trl.data_utils")
    if not hasattr(data_utils, "common_prefix_length"):
        pytest.skip("this trl has no common_prefix_length")
    tokenizer = tiny_chat_tokenizer()
    for prompt, answer in zip(PROMPTS, ANSWERS):
        prompt_ids = data_utils._tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        full_ids = data_utils._tokenize(tokenizer, prompt + [{"role": "assistant", "content": answer}])["input_ids"]
        assert answer_token_ids(tokenizer, prompt, answer) == (
            full_ids,
            data_utils.common_prefix_length(prompt_ids, full_ids),
        )


def test_nll_and_perplexity_match_an_unbatched_loop():
    model, tokenizer = tiny_model("llama"), tiny_chat_tokenizer()
    prompts, answers = PROMPTS[:2], ANSWERS[:2]  # different lengths: batch_size 2 pads the shorter one on the right
    nll, tokens = 0.0, 0
    for prompt, answer in zip(prompts, answers):
        ids, start = answer_token_ids(tokenizer, prompt, answer)
        log_probs = conversation_logits(model, ids).log_softmax(-1)
        targets = torch.tensor(ids[start:])
        nll -= float(log_probs[start - 1 : len(ids) - 1].gather(-1, targets[:, None]).sum())
        tokens += len(targets)
    scores = answer_scores(model, tokenizer, prompts, answers, batch_size=2)
    assert isinstance(scores, AnswerScores)
    assert (scores.prompts, scores.answer_tokens) == (2, tokens) == (2, 3 + 14)  # each answer + <|im_end|>
    assert scores.answer_nll == pytest.approx(nll / tokens, abs=1e-5)
    assert scores.answer_ppl == pytest.approx(math.exp(scores.answer_nll), rel=1e-12)
    assert scores.match_tokens == tokens  # both answers are shorter than MATCH_TOKENS
    assert set(scores.to_dict()) == set(AnswerScores.__dataclass_fields__)


def test_dense_model_matches_its_own_greedy_answers():
    dense, tokenizer = characters_only(tiny_model("llama")), tiny_chat_tokenizer()
    # 12 generated tokens, 10 compared: the answers run past the match window, as real dense answers do (the
    # template's closing <|im_end|> after a cut-off answer is not a token the dense model chose)
    answers = [greedy_answer(dense, tokenizer, prompt, 12) for prompt in PROMPTS]
    scores = answer_scores(dense, tokenizer, PROMPTS, answers, match_tokens=10, batch_size=2)
    assert scores.match_tokens == 3 * 10
    assert scores.greedy_match == 1.0
    other = answer_scores(tiny_model("llama", seed=1), tokenizer, PROMPTS, answers, match_tokens=10, batch_size=2)
    assert other.greedy_match < 1.0


def test_greedy_match_of_one_prompt_counted_by_hand():
    model, tokenizer = characters_only(tiny_model("llama")), tiny_chat_tokenizer()
    prompt = PROMPTS[1]
    own = greedy_answer(model, tokenizer, prompt, 8)
    answer = own[:2] + ("~" if own[2] != "~" else "!") + own[3:]  # one wrong token: it and what follows can miss
    ids, start = answer_token_ids(tokenizer, prompt, answer)
    predicted = conversation_logits(model, ids).argmax(-1)
    for window in (5, MATCH_TOKENS):  # 5 answer tokens; more than the answer's 9 tokens: all of them
        compared = min(window, len(ids) - start)
        hits = sum(int(predicted[t - 1]) == ids[t] for t in range(start, start + compared))
        assert 2 <= hits < compared  # the two leading own tokens match, the replaced one does not
        scores = answer_scores(model, tokenizer, [prompt], [answer], match_tokens=window)
        assert (scores.match_tokens, scores.greedy_match) == (compared, hits / compared)
    assert compared == 9  # 8 characters + <|im_end|>


def test_perplexity_past_the_float_range_is_inf():
    """A model that all but rules out the end-of-turn token (NLL ~1e4 on it) gets an infinite perplexity, not an
    OverflowError that would lose the greedy match with it."""
    model, tokenizer = characters_only(tiny_model("llama"), penalty=1e4), tiny_chat_tokenizer()
    scores = answer_scores(model, tokenizer, PROMPTS[:1], ANSWERS[:1])
    assert scores.answer_nll > 1e3 and scores.answer_ppl == math.inf


def test_bad_input_is_refused():
    model, tokenizer = tiny_model("llama"), tiny_chat_tokenizer()
    with pytest.raises(DlpError, match="2 prompts but 1 answers"):
        answer_scores(model, tokenizer, PROMPTS[:2], ANSWERS[:1])
    with pytest.raises(DlpError, match="at least one prompt"):
        answer_scores(model, tokenizer, [], [])
    with pytest.raises(DlpError, match="match_tokens"):
        answer_scores(model, tokenizer, PROMPTS[:1], ANSWERS[:1], match_tokens=0)
    tokenizer.chat_template = "{% for m in messages if m['role'] == 'user' %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DlpError, match="no answer tokens"):  # a template that drops the assistant turn
        answer_scores(model, tokenizer, PROMPTS[:1], ANSWERS[:1])
