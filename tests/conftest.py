"""Shared fixtures: the real default model (converted once per session into a temporary cache),
a tiny random model built with its tokenizer, and the real guard (MiniLM ships in a package)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """A fresh model cache for the session, so the first-start conversion is really exercised."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["CHATBOT_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def default_model_dir(cache_dir):
    from chatbot.loading import convert_default_model

    return convert_default_model()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def make_tiny_model(vocab_size: int, hidden: int = 32, seed: int = 0, tie: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def save_adapter(path, hidden=32, vocab=None, seed=1, targets=("q_proj", "v_proj")):
    """A random LoRA adapter for the tiny model (non-zero B, so it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = make_tiny_model(vocab, hidden=hidden)
    torch.manual_seed(seed)  # the LoRA matrices' random init
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False))
    peft_model.save_pretrained(path)
    return path


def _save_tiny(folder, tokenizer, hidden: int = 32):
    make_tiny_model(len(tokenizer), hidden=hidden).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved with the default model's real tokenizer."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-model"), tokenizer)


@pytest.fixture(scope="session")
def tiny_dir_4bit(tmp_path_factory, tokenizer):
    """The tiny Llama 64 wide, for bitsandbytes' 4-bit layers: on a CPU with AVX-512 BF16 they
    repack weights in blocks of 64 input features, and a 32-wide layer fails there ("shape
    '[32, 0]' is invalid"). Real models' widths are multiples of 64."""
    return _save_tiny(tmp_path_factory.mktemp("tiny-model-64"), tokenizer, hidden=64)


@pytest.fixture(scope="session")
def guard():
    from safety import Guard

    g = Guard()
    g.warm_up()
    return g


@pytest.fixture(scope="session")
def real_model(default_model_dir):
    from chatbot.config import ModelConfig
    from chatbot.loading import load_model

    return load_model(ModelConfig(adapter=None))
