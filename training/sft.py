"""SFT: chat-template formatting with the loss on the assistant's tokens only.

    python -m training sft --config training/recipes/smollm2-135m/sft.yaml [--max-steps 2]

Starting from the domain stage: set `init_adapter` to the domain run's folder. SFT then keeps
training those same LoRA matrices, so one adapter carries both stages and loads on the plain base.
"""

from __future__ import annotations

import logging

from chatbot.prompts import SYSTEM_PROMPT

from .config import SftConfig
from .data import DataError, Pair, dedup, load_pairs, split_pairs

log = logging.getLogger(__name__)
IGNORE = -100


def system_prompt_of(setting: str | None) -> str | None:
    return SYSTEM_PROMPT if setting == "default" else setting


def messages_for(question: str, system: str | None, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": question})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def _ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, enable_thinking=False, return_dict=False
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def encode_pair(tokenizer, pair: Pair, system: str | None, max_length: int) -> dict | None:
    """input_ids and labels for one pair; labels are -100 everywhere but the assistant's reply.

    The reply's tokens and its end-of-turn token are learned; the template's whitespace after the
    end-of-turn is not. A reply cut by max_length keeps its first tokens. None if the prompt alone
    does not fit.
    """
    prompt = _ids(tokenizer, messages_for(pair.question, system), add_generation_prompt=True)
    full = _ids(tokenizer, messages_for(pair.question, system, pair.answer), add_generation_prompt=False)
    if full[: len(prompt)] != prompt:
        raise DataError("the chat template does not render the prompt as a prefix of the conversation")
    end = len(full)
    while end > len(prompt) and not tokenizer.decode(full[end - 1 : end]).strip():
        end -= 1  # trailing newline after <|im_end|>
    full = full[:end]
    if len(prompt) > max_length - 8:
        return None
    full = full[:max_length]
    labels = [IGNORE] * len(prompt) + full[len(prompt) :]
    return {"input_ids": full, "attention_mask": [1] * len(full), "labels": labels}


def build_datasets(cfg: SftConfig, tokenizer):
    pairs = load_pairs(cfg.data, cfg.preset, cfg.question_column, cfg.answer_column, cfg.group_column, cfg.split_column)
    stats = {"rows": len(pairs)}
    if cfg.dedup:
        pairs, stats["duplicates_dropped"] = dedup(pairs)
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction)
    if not train_pairs:
        raise DataError(f"{cfg.data}: no training rows (check split_column values: train/val/test)")
    val_pairs = val_pairs[: cfg.max_val_examples]
    system = system_prompt_of(cfg.system_prompt)
    out = {}
    for name, subset in (("train", train_pairs), ("val", val_pairs)):
        encoded = [encode_pair(tokenizer, p, system, cfg.max_length) for p in subset]
        stats[f"{name}_too_long_dropped"] = sum(e is None for e in encoded)
        out[name] = [e for e in encoded if e is not None]
        stats[f"{name}_examples"] = len(out[name])
        stats[f"{name}_groups"] = len({p.group for p in subset})
    if not out["train"]:
        raise DataError(
            f"{cfg.data}: every training prompt is longer than max_length={cfg.max_length} tokens "
            "(system prompt + question); raise max_length or shorten the system prompt"
        )
    stats["train_tokens"] = sum(len(e["input_ids"]) for e in out["train"])
    stats["train_target_tokens"] = sum(sum(t != IGNORE for t in e["labels"]) for e in out["train"])
    return out["train"], out["val"], stats


def run(cfg: SftConfig):
    from .trainer import train

    return train(cfg, "sft", lambda tokenizer: build_datasets(cfg, tokenizer))[0]
