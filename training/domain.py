"""Domain adaptation: continued pre-training with LoRA on packed text.

    python -m training domain --config training/recipes/smollm2-135m/domain.yaml [--max-steps 2]

The text (PDF, plain text or Markdown) is cleaned, split into paragraphs, tokenised, joined with
end-of-text tokens and cut into blocks of exactly max_length tokens: no padding at all. The last
val_fraction of the blocks (the end of the text, not a random sample) is held out.
"""

from __future__ import annotations

from .config import DomainConfig
from .data import DataError, load_text, pack


def build_datasets(cfg: DomainConfig, tokenizer):
    docs = [load_text(path) for path in cfg.data]
    token_lists = [tokenizer(doc, add_special_tokens=False).input_ids for doc in docs]
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    blocks = pack(token_lists, cfg.max_length, eos)
    if len(blocks) < 2:
        raise DataError(
            f"{', '.join(map(str, cfg.data))}: only {sum(map(len, token_lists))} tokens, too little text for "
            f"blocks of {cfg.max_length}"
        )
    n_val = max(1, round(len(blocks) * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    train_blocks, val_blocks = blocks[: len(blocks) - n_val], blocks[len(blocks) - n_val :]
    rows = lambda bs: [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in bs]  # noqa: E731
    stats = {
        "documents": len(docs),
        "words": sum(len(d.split()) for d in docs),
        "tokens": sum(map(len, token_lists)),
        "train_examples": len(train_blocks),
        "val_examples": len(val_blocks),
        "train_tokens": len(train_blocks) * cfg.max_length,
    }
    return rows(train_blocks), rows(val_blocks), stats


def run(cfg: DomainConfig):
    from .trainer import train

    return train(cfg, "domain", lambda tokenizer: build_datasets(cfg, tokenizer))[0]
