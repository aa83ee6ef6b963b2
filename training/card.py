"""The adapter folder's model card (README.md) and loss-curve plot."""

from __future__ import annotations

from pathlib import Path

NOT_A_THERAPIST = (
    "This adapter makes a small language model sound more like a supportive counsellor. It is not a "
    "therapist, cannot assess risk, and must not be used for diagnosis, treatment or crisis care. "
    "In the app every message and reply also passes a separate safety layer that routes people at "
    "risk to crisis lines; anyone in danger should contact local emergency services."
)


def write_loss_plot(history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _earlier_stage(init_adapter: str | None) -> str:
    """A section on the adapter this run continued, read from that adapter's own folder."""
    import json

    if not init_adapter:
        return ""
    folder = Path(init_adapter)
    try:
        config = json.loads((folder / "training_config.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return f"\n## Earlier stage\n\nContinues the adapter `{init_adapter}` (its records were not found).\n"
    data = config.get("data")
    data = ", ".join(map(str, data)) if isinstance(data, list) else data
    keys = ("steps", "tokens_seen", "base_val_perplexity", "val_perplexity", "train_seconds")
    rows = "\n".join(f"| {k} | {_fmt(metrics[k])} |" for k in keys if k in metrics)
    return f"""
## Earlier stage: {metrics.get("stage", "?")}

This adapter continues `{init_adapter}` (same LoRA matrices, trained further), so it carries
both stages. That stage read `{data}`: {(config.get("data_description") or "no description").rstrip(".")}.

| metric (earlier stage, its own validation data) | value |
|---|---|
{rows}
"""


def write_card(out: Path, cfg, stage: str, metrics: dict) -> None:
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if not isinstance(v, dict))
    data_rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in metrics.get("data", {}).items())
    hyper = ", ".join(
        f"{k}={getattr(cfg, k)}"
        for k in ("lora_r", "lora_alpha", "lora_dropout", "learning_rate", "lr_scheduler", "batch_size",
                  "grad_accum", "max_length", "max_steps", "epochs", "seed", "quantize", "init_adapter")
    )
    data = cfg.data if isinstance(cfg.data, str) else ", ".join(map(str, cfg.data))
    stage_text = {
        "domain": "continued pre-training (domain adaptation) with LoRA on packed text",
        "sft": "instruction fine-tuning with LoRA, loss on the assistant's tokens only",
    }[stage]
    card = f"""---
library_name: peft
base_model: {cfg.model}
license: mit
tags: [lora, mental-health, {stage}]
---

# {out.name}

A LoRA adapter for `{cfg.model}`: {stage_text}. Made with this project's training module
(`python -m training {stage}`); the exact settings are in `training_config.json`.

## Intended use and limitations

{NOT_A_THERAPIST}

Small models make things up, repeat themselves and miss context; the training data's answers
come from one community of writers and reflect their style and cultural assumptions.

## Data

- Source: `{data}`
- {cfg.data_description or "No description given (set data_description in the recipe)."}

| data | value |
|---|---|
{data_rows}

## Training

{hyper}
{_earlier_stage(getattr(cfg, "init_adapter", None))}
## Metrics

Validation loss and perplexity are on held-out data that no training step saw; `base_` rows are
the same model with the adapter switched off.

| metric | value |
|---|---|
{rows}

![loss curve](loss.png)
"""
    (out / "README.md").write_text(card)
