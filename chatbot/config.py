"""Configuration for the chatbot: one dataclass per concern, one source of defaults.

CLI flags (app.py), environment variables (Spaces) and YAML recipes (training) all land here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
QUANTIZE_CHOICES = ("auto", "4bit", "8bit", "none")
BACKEND_CHOICES = ("auto", "onnx", "torch")  # chat decoding: chatbot/onnx_engine.py or torch
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ADAPTER = PROJECT_ROOT / "adapters" / "smollm2-135m-counsel"


def cache_dir() -> Path:
    """Where converted models live; override with CHATBOT_CACHE_DIR."""
    env = os.environ.get("CHATBOT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mh-chatbot"


@dataclass
class ModelConfig:
    model: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": f"'{DEFAULT_MODEL}' (built in, offline), a Hub model id, or a local folder."},
    )
    adapter: str | None = field(
        default=None,
        metadata={"help": "LoRA adapter: a local PEFT folder or a Hub id; 'none' for the base model alone."},
    )
    quantize: str = field(
        default="auto",
        metadata={"help": "auto (4-bit NF4 on CUDA, int8 weight-only on CPU), 4bit, 8bit (bitsandbytes) or none (full precision)."},
    )
    merge: bool = field(default=False, metadata={"help": "Merge the adapter into the base weights."})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda."})
    backend: str = field(
        default="auto",
        metadata={"help": "Chat decoding: auto (ONNX Runtime GenAI on a CPU with int8 weights, where installed), onnx or torch."},
    )

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {self.quantize!r}")
        if self.adapter is not None and self.adapter.strip().lower() in ("", "none"):
            self.adapter = None
        if self.backend not in BACKEND_CHOICES:
            raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {self.backend!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass
class GenerationConfig:
    max_new_tokens: int = field(default=256, metadata={"help": "Longest reply, in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "0 for greedy decoding."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling mass."})
    repetition_penalty: float = field(default=1.1, metadata={"help": "Discourages loops in small models."})
    seed: int | None = field(default=None, metadata={"help": "Fix sampling for reproducible replies."})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class Limits:
    """Named limits, readable from the environment like gradio demos do."""

    max_input_chars: int = int(os.environ.get("MAX_INPUT_CHARS", 2000))
    max_input_tokens: int = int(os.environ.get("MAX_INPUT_TOKEN_LENGTH", 1536))
    queue_size: int = int(os.environ.get("QUEUE_MAX_SIZE", 32))


def help_of(cls, name: str) -> str:
    """The help text of one dataclass field (for argparse)."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)
