"""One config dataclass per stage; YAML recipes and CLI flags both land here.

    cfg = load_config(SftConfig, "training/recipes/smollm2-135m/sft.yaml", {"max_steps": 2})

Unknown keys in a recipe are rejected; every field has help text, which `--help` prints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from chatbot.config import DEFAULT_MODEL, QUANTIZE_CHOICES

PRESETS = ("auto", "context_response", "human_zen", "text_markers", "questions_answers", "columns")


def _f(default, help_text: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help_text}, **kw)
    return field(default=default, metadata={"help": help_text}, **kw)


@dataclass
class ModelSection:
    model: str = _f(DEFAULT_MODEL, f"Base model: '{DEFAULT_MODEL}' (built in), a Hub id or a local folder.")
    quantize: str = _f("none", "none (LoRA), 4bit (QLoRA, NF4) or 8bit; 4bit/8bit need bitsandbytes and a CUDA GPU.")
    device: str = _f("auto", "auto, cpu or cuda.")

    def _check_model(self) -> None:
        if self.quantize not in QUANTIZE_CHOICES or self.quantize == "auto":
            raise ValueError(f"quantize must be none, 4bit or 8bit, got {self.quantize!r}")


@dataclass
class TrainSection:
    output_dir: str = _f("runs/adapter", "Folder for the adapter, its card, metrics and checkpoints.")
    overwrite: bool = _f(False, "Replace a finished adapter in output_dir (otherwise refuse to overwrite it).")
    resume: bool = _f(True, "Continue from the newest checkpoint in output_dir if there is one.")
    max_steps: int = _f(-1, "Optimizer steps; -1 means train for `epochs` epochs.")
    epochs: float = _f(1.0, "Passes over the training data (when max_steps is -1).")
    batch_size: int = _f(4, "Sequences per step on the device.")
    grad_accum: int = _f(1, "Gradient accumulation steps (effective batch = batch_size * grad_accum).")
    learning_rate: float = _f(2e-4, "Peak learning rate (AdamW).")
    lr_scheduler: str = _f("cosine", "transformers scheduler name: cosine, linear, constant, ...")
    warmup: float = _f(0.05, "Warm-up: a fraction of the steps (< 1) or a number of steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    seed: int = _f(42, "Seed for sampling, dropout and data order.")
    max_length: int = _f(256, "Tokens per training sequence.")
    logging_steps: int = _f(5, "Log the loss every this many steps.")
    save_steps: int = _f(50, "Write a checkpoint every this many steps.")
    save_total_limit: int = _f(2, "Checkpoints to keep.")
    eval_steps: int = _f(0, "Validation loss every this many steps; 0: only at the end.")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory (useful for QLoRA on larger bases).")
    bf16: bool = _f(False, "bfloat16 mixed precision (GPU).")
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_targets: list = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get LoRA matrices.",
    )
    init_adapter: str | None = _f(None, "Start from this adapter's weights (e.g. the domain stage's output).")
    data_description: str = _f("", "The data's name, source and licence, for the model card.")

    def _check_train(self) -> None:
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be -1 (use epochs) or a positive number")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps", "save_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_length < 16:
            raise ValueError("max_length must be at least 16")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_dropout must be in [0, 1)")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")


@dataclass
class DomainConfig(ModelSection, TrainSection):
    """Continued pre-training with LoRA on packed text (PDF, plain text or Markdown)."""

    data: list = _f([], "Text sources: .pdf, .txt or .md files (or folders of them).")
    val_fraction: float = _f(0.05, "Share of the packed blocks held out for validation.")

    def __post_init__(self) -> None:
        self._check_model()
        self._check_train()
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError("data: give at least one text, Markdown or PDF file")
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError("val_fraction must be in [0, 0.5)")


@dataclass
class SftConfig(ModelSection, TrainSection):
    """Instruction fine-tuning on question/answer pairs, loss on the assistant's tokens only."""

    data: str = _f("", "Q/A pairs: a .csv, .json or .jsonl file, or a Hub data set id.")
    preset: str = _f("auto", f"Layout of the file: one of {PRESETS}.")
    question_column: str | None = _f(None, "Column with the user's message (preset 'columns').")
    answer_column: str | None = _f(None, "Column with the reply (preset 'columns').")
    group_column: str | None = _f(None, "Rows sharing this value stay in one split (default: the question text).")
    split_column: str | None = _f(None, "Column naming each row's split (train/val/test); else split by group.")
    val_fraction: float = _f(0.1, "Share of groups held out for validation when there is no split column.")
    max_val_examples: int = _f(200, "Cap on validation examples (evaluation cost).")
    dedup: bool = _f(True, "Drop repeated (question, answer) pairs.")
    system_prompt: str | None = _f("default", "'default' (the app's prompt), a custom prompt, or null for none.")

    def __post_init__(self) -> None:
        self._check_model()
        self._check_train()
        if not self.data:
            raise ValueError("data: give a CSV/JSON/JSONL file or a Hub data set id")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        if self.preset == "columns" and not (self.question_column and self.answer_column):
            raise ValueError("preset 'columns' needs question_column and answer_column")
        if not 0 < self.val_fraction < 0.5:
            raise ValueError("val_fraction must be in (0, 0.5)")


@dataclass
class MergeConfig(ModelSection):
    """Merge an adapter into a full-precision copy of its base and save the result."""

    adapter: str = _f("", "Adapter folder (or Hub id) to merge.")
    output_dir: str = _f("runs/merged", "Folder for the merged model.")
    model: str | None = _f(None, "Base model; default: the one named in the adapter folder.")

    def __post_init__(self) -> None:
        self._check_model()
        if not self.adapter:
            raise ValueError("adapter: give the adapter folder to merge")


@dataclass
class EvaluateConfig(ModelSection):
    """Base vs adapter on a held-out split: perplexity, similarity, samples, safety regression."""

    adapter: str = _f("", "Adapter folder (or Hub id) to evaluate against its base.")
    model: str | None = _f(None, "Base model; default: the one named in the adapter folder.")
    data: str = _f("", "Held-out Q/A pairs (same formats as sft).")
    preset: str = _f("auto", f"Layout of the file: one of {PRESETS}.")
    question_column: str | None = _f(None, "Column with the user's message (preset 'columns').")
    answer_column: str | None = _f(None, "Column with the reply (preset 'columns').")
    split_column: str | None = _f(None, "Column naming each row's split.")
    split: str = _f("test", "Which split to evaluate when split_column is set.")
    max_examples: int = _f(0, "Perplexity on at most this many pairs (0 = all).")
    generate_examples: int = _f(12, "Questions answered by both models for similarity and samples.")
    max_new_tokens: int = _f(96, "Longest generated answer.")
    max_length: int = _f(512, "Longest scored sequence (prompt + reference answer), in tokens.")
    crisis_prompts: bool = _f(True, "Safety regression: screen both models' replies to crisis prompts.")
    seed: int = _f(0, "Sampling seed (decoding is greedy; the seed fixes everything else).")
    system_prompt: str | None = _f("default", "As in sft: must match how the adapter was trained.")
    output_dir: str = _f("runs/eval", "Folder for report.md and report.json.")

    def __post_init__(self) -> None:
        self._check_model()
        if not self.adapter:
            raise ValueError("adapter: give the adapter folder to evaluate")
        if not self.data:
            raise ValueError("data: give the held-out Q/A file")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")


STAGES = {"domain": DomainConfig, "sft": SftConfig, "merge": MergeConfig, "evaluate": EvaluateConfig}


def read_recipe(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"recipe {path} not found") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"recipe {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping of option: value")
    return data


def build_config(cls, values: dict, source: str = "config"):
    """Instantiate cls from a dict; unknown keys and bad values become one clear ValueError."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from None


NULL = "\0null"  # a flag given as `null`: override the recipe's value with None


def load_config(cls, recipe: str | Path | None, overrides: dict | None = None):
    """Recipe values, then the overrides that were given (None = not given, NULL = set to None)."""
    values = read_recipe(recipe) if recipe else {}
    values.update({k: (None if v == NULL else v) for k, v in (overrides or {}).items() if v is not None})
    return build_config(cls, values, str(recipe or "command line"))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
