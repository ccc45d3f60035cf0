"""The recovery data in trl's formats: what each format trains on (hand-checked token by token), packing, the
teacher on those batches, self-generated rows and the chat evaluation in a run, and one-line refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_chat_tokenizer, tiny_model, tiny_tokenizer
from dlp.errors import DlpError
from dlp.sft_data import TrainRows, check_chat_template, load_rows_source

# the tiny tokenizer: a printable character c is id ord(c) - 32; <|im_end|> (EOS, pad) is 96, <|im_start|> 97
END, START = 96, 97
GENERATION_TEMPLATE = (  # the tiny ChatML template with trl's {% generation %} markers around assistant turns
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant ' }}{% generation %}"
    "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)


def ids(text: str) -> list[int]:
    return [ord(c) - 32 for c in text]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def sft_args(tmp_path: Path, **settings):
    from trl import SFTConfig

    defaults = dict(max_length=64, per_device_train_batch_size=2, report_to="none", bf16=False, use_cpu=True)
    return SFTConfig(output_dir=str(tmp_path / "trainer"), **{**defaults, **settings})


def prepared(tmp_path: Path, source: str, tokenizer=None, fmt: str = "auto", **settings):
    """dlp's path to the trainer: the source read and checked, handed to trl's SFTTrainer; returns the trainer."""
    from trl import SFTTrainer

    from dlp.config import FinetuneArguments
    from dlp.finetune import training_dataset
    from dlp.trainer import recovery_trainer

    tokenizer = tokenizer or tiny_chat_tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token  # as dlp.finetune.train does
    args = sft_args(tmp_path, **settings)
    data = load_rows_source(source, "train", fmt, 0)
    check_chat_template(tokenizer, data, "tiny", args)
    dataset = training_dataset(tokenizer, data, FinetuneArguments(train_data=source), args)
    return recovery_trainer(SFTTrainer)(
        model=tiny_model(), args=args, train_dataset=dataset, processing_class=tokenizer
    )


def test_prompt_completion_strings_train_on_the_completion_and_eos(tmp_path):
    source = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "ab", "completion": "cd"}])
    row = prepared(tmp_path, source).train_dataset[0]
    assert row["input_ids"] == ids("abcd") + [END]
    assert row["labels"] == [-100, -100, *ids("cd"), END]


def test_conversational_prompt_completion_trains_on_the_answer_turn_only(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}]
    row = prepared(tmp_path, write_jsonl(tmp_path / "c.jsonl", rows)).train_dataset[0]
    prompt = [START, *ids("user hi"), END, START, *ids("assistant ")]
    assert row["input_ids"] == prompt + ids("yo") + [END]
    assert row["labels"] == [-100] * len(prompt) + ids("yo") + [END]


def test_messages_train_on_every_token_or_on_assistant_turns_only(tmp_path):
    turns = [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")]
    source = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": r, "content": c} for r, c in turns]}])
    expected = []
    for role, content in turns:
        expected += [START, *ids(f"{role} {content}"), END]
    whole = prepared(tmp_path, source).train_dataset[0]
    assert whole["input_ids"] == expected and whole["labels"] == expected
    tokenizer = tiny_chat_tokenizer()
    tokenizer.chat_template = GENERATION_TEMPLATE
    masked = prepared(tmp_path, source, tokenizer, assistant_only_loss=True).train_dataset[0]
    assert masked["input_ids"] == expected
    hidden = [START, *ids("user a"), END, START, *ids("assistant ")]
    answer = [*ids("b"), END]
    assert masked["labels"] == [-100] * len(hidden) + answer + [-100] * len(hidden) + [*ids("d"), END]


def test_text_rows_become_consecutive_windows_trained_on_every_token(tmp_path):
    text = [{"text": "the quick brown fox jumps over the lazy dog " * 3}, {"text": "second row " * 8}]
    trainer = prepared(tmp_path, write_jsonl(tmp_path / "t.jsonl", text), tiny_tokenizer(), max_length=16)
    joined = "\n\n".join(row["text"] for row in text)  # rows joined as dlp joins .jsonl rows
    stream = [95 if c == "\n" else ord(c) - 32 for c in joined]  # a newline is <unk> (95) to this tokenizer
    rows = trainer.train_dataset
    assert len(rows) == len(stream) // 16
    for number, row in enumerate(rows):
        assert row["input_ids"] == stream[number * 16 : (number + 1) * 16] and row["labels"] == row["input_ids"]


def test_json_and_parquet_files_are_read_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(3)
    ]
    (tmp_path / "m.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    for name in ("m.json", "m.parquet"):
        data = load_rows_source(str(tmp_path / name), "train", "auto", 0)
        assert data.format == "messages" and data.conversational and data.rows == rows
    assert len(load_rows_source(str(tmp_path / "m.json"), "train", "auto", 2).rows) == 2


def packed_batch(tmp_path: Path):
    """Six short conversations packed (trl's best fit) into rows of 64 tokens, and a padding-free batch of two."""
    rows = [
        {
            "prompt": [{"role": "user", "content": f"q{i}" * (i + 1)}],
            "completion": [{"role": "assistant", "content": f"a{i}"}],
        }
        for i in range(6)
    ]
    trainer = prepared(tmp_path, write_jsonl(tmp_path / "p.jsonl", rows), packing=True)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    return trainer, batch


def test_packing_keeps_conversations_apart_for_the_student_and_the_teacher(tmp_path):
    """trl packs; the padding-free batch carries position ids that restart per conversation, the attention keeps
    them apart (each one's logits as alone), and both teachers see exactly the student's sequences."""
    from dlp.distill import CachedTeacher, OnlineTeacher, build_teacher_cache, sequences_of_row
    from dlp.finetune import prepared_sequences

    trainer, batch = packed_batch(tmp_path)
    assert len(trainer.train_dataset) < 6 and "position_ids" in batch and "attention_mask" not in batch
    sequences = prepared_sequences(trainer.train_dataset)
    assert len(sequences) == 6
    teacher = tiny_model("llama", seed=3)
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    packed = teacher(**inputs, use_cache=False).logits[0]
    spans = sequences_of_row(batch["input_ids"][0], position_ids=batch["position_ids"][0])
    assert len(spans) == sum(len(trainer.train_dataset[i]["seq_lengths"]) for i in (0, 1))
    for start, end in spans:
        alone = teacher(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits[0]
        torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-5)
    predicted = batch["labels"][:, 1:] != -100
    build_teacher_cache(teacher, sequences, tmp_path / "cache", key="k", top_k=128, temperature=1.0)
    online = OnlineTeacher(teacher, 1.0).targets(inputs, predicted)
    cached = CachedTeacher(tmp_path / "cache", sequences).targets(inputs, predicted)
    assert cached.log_probs.shape[0] == online.log_probs.shape[0] == int(predicted.sum())
    full = torch.full_like(online.log_probs, float("-inf")).scatter(1, cached.indices.long(), cached.log_probs)
    torch.testing.assert_close(full, online.log_probs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"foo": 1}], "neither a 'text' column, 'prompt' and 'completion' columns nor a 'messages' column"),
        ([], "holds no rows"),
        ([{"messages": [{"content": "hi"}]}], "turn 1 has no 'role'"),
        ([{"messages": [{"role": "bot", "content": "hi"}]}], "turn 1 has role 'bot'; roles are system, user"),
        ([{"messages": []}], "messages must be a non-empty list"),
        (
            [{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}],
            "must both be strings or both lists",
        ),
    ],
)
def test_bad_rows_are_refused_in_one_line(tmp_path, rows, message):
    with pytest.raises(DlpError, match=message) as raised:
        load_rows_source(write_jsonl(tmp_path / "bad.jsonl", rows), "train", "auto", 0)
    assert "\n" not in str(raised.value)


def test_unreadable_files_and_mismatched_formats_are_refused(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DlpError, match="cannot read .*bad.parquet as parquet"):
        load_rows_source(str(tmp_path / "bad.parquet"), "train", "auto", 0)
    source = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DlpError, match="train_format: messages needs the column"):
        load_rows_source(source, "train", "messages", 0)


def test_conversations_need_a_chat_template_and_assistant_masks_a_marked_one(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    data = load_rows_source(write_jsonl(tmp_path / "m.jsonl", rows), "train", "auto", 0)
    with pytest.raises(DlpError, match="holds conversations, but the tokenizer of tiny has no chat template"):
        check_chat_template(tiny_tokenizer(), data, "tiny", sft_args(tmp_path))
    with pytest.raises(DlpError, match="no \\{% generation %\\} markers and trl has no training template"):
        check_chat_template(tiny_chat_tokenizer(), data, "tiny", sft_args(tmp_path, assistant_only_loss=True))
    strings = TrainRows("x", "prompt-completion", False, [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DlpError, match="assistant_only_loss needs conversations"):
        check_chat_template(tiny_chat_tokenizer(), strings, "tiny", sft_args(tmp_path, assistant_only_loss=True))


# --- the pipeline with self-generated rows and the chat evaluation (a tiny Llama whose tokenizer has a template)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-chat")
    tiny_model("llama").save_pretrained(path)
    tiny_chat_tokenizer().save_pretrained(path)
    return path


def prompt_file(path: Path, words: list[str]) -> str:
    return write_jsonl(path, [{"prompt": f"say {word}"} for word in words])


def chat_recipe(tmp_path: Path, model_dir: Path, **overrides) -> Path:
    from test_prune_lora import write_recipe

    settings = dict(
        train_data="selfgen:" + prompt_file(tmp_path / "train.jsonl", [f"w{i}" for i in range(40)]),
        selfgen_prompts=40,
        selfgen_max_new_tokens=8,
        selfgen_batch_size=8,
        chat_eval_data=prompt_file(tmp_path / "heldout.jsonl", [f"h{i}" for i in range(6)]),
        chat_eval_prompts=6,
        chat_eval_max_new_tokens=8,
        chat_eval_examples=2,
        packing=True,
        max_steps=6,
    )
    return write_recipe(tmp_path / "recipe.yaml", model_dir, **{**settings, **overrides})


def test_self_generated_rows_train_and_the_chat_evaluation_reports(chat_model_dir, tmp_path):
    from test_prune_lora import SCRIPT, run

    out = tmp_path / "run"
    args = [
        sys.executable,
        str(SCRIPT),
        "--config",
        str(chat_recipe(tmp_path, chat_model_dir)),
        "--output_dir",
        str(out),
    ]
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["data_format"] == "prompt-completion" and report["training"]["train_rows"] < 40
    manifest = json.loads((out / "selfgen" / "manifest.json").read_text())
    assert manifest["prompts"] == 40 and manifest["settings"]["sampling"] == "greedy"
    chat = report["chat"]
    assert set(chat["scores"]) == {"dense", "pruned", "finetuned"} and chat["count"] == 6
    assert all(0.0 <= entry["greedy_match"] <= 1.0 and entry["answer_ppl"] > 1 for entry in chat["scores"].values())
    assert len(chat["examples"]) == 2 and {"prompt", "dense", "pruned", "finetuned"} <= set(chat["examples"][0])
    summary = (out / "summary.md").read_text()
    assert "| model | answer perplexity | greedy match |" in summary and "| model | greedy answer |" in summary
    assert report["export"]["reloaded_violations"] == 0
    rerun = run(args)
    assert rerun.returncode == 0 and json.loads((out / "report.json").read_text()) == report


def test_bad_training_data_stops_the_pipeline_before_any_stage(chat_model_dir, tmp_path):
    from test_prune_lora import SCRIPT, run

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "narrator", "content": "x"}]}])
    recipe = chat_recipe(tmp_path, chat_model_dir, train_data=bad)
    result = run([sys.executable, str(SCRIPT), "--config", str(recipe), "--output_dir", str(tmp_path / "run")])
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    assert result.stderr.strip().count("\n") == 0 and "role 'narrator'" in result.stderr
