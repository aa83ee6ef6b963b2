"""The shared training run behind `domain` and `sft`: model, LoRA, Trainer, outputs.

Loading goes through chatbot.loading, so training and the app read models the same way.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import shutil
import time
from pathlib import Path

from .card import write_card, write_loss_plot
from .config import to_dict
from .sft import IGNORE

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"


def lora_config(cfg):
    """Translate the config's LoRA fields into a peft LoraConfig."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        task_type="CAUSAL_LM",
    )


def prepare_model(cfg):
    """Base model (quantized for QLoRA when asked) with a trainable LoRA adapter."""
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    from chatbot.config import ModelConfig
    from chatbot.loading import check_adapter_fits, load_base, resolve_adapter

    model, tokenizer = load_base(ModelConfig(model=cfg.model, quantize=cfg.quantize, device=cfg.device))
    if cfg.quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if cfg.init_adapter:
        adapter_dir = resolve_adapter(cfg.init_adapter)
        check_adapter_fits(model, adapter_dir)
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(cfg))
    model.train()
    return model, tokenizer


class ScoredLogitsCollator:
    """Pads like `inner` and adds `logits_to_keep`: a mask of the positions whose next token is
    scored. The model then projects only those onto the vocabulary (49k wide for SmolLM2), not
    the prompt and padding as well; `scored_loss` reads them back in the same order."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, rows):
        import torch

        batch = self.inner(rows)
        if "labels" in batch:
            scored = batch["labels"][:, 1:] != IGNORE
            batch["logits_to_keep"] = torch.cat([scored, torch.zeros_like(scored[:, :1])], dim=1)
        return batch


def scored_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy of the kept logits (one row per scored position, as ScoredLogitsCollator
    asked) against their next tokens: the model's own loss, computed on less."""
    import torch

    targets = labels[:, 1:]
    targets = targets[targets != IGNORE]
    total = torch.nn.functional.cross_entropy(outputs.logits.float(), targets.to(outputs.logits.device),
                                              reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


def check_output_dir(cfg) -> Path:
    out = Path(cfg.output_dir)
    if (out / "adapter_model.safetensors").exists():
        if not cfg.overwrite:
            raise FileExistsError(f"{out} already holds a finished adapter; pass --overwrite or another --output-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def takes_logits_to_keep(model) -> bool:
    """Whether the (base) model's forward takes a logits_to_keep mask, so that the scored loss can
    be used: every causal LM in transformers 5 does; remote code may not (all logits then)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def train(cfg, stage: str, build_datasets):
    """Train, then write the adapter folder; returns (metrics dict, trained PeftModel)."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    out = check_output_dir(cfg)
    set_seed(cfg.seed)
    model, tokenizer = prepare_model(cfg)
    train_set, val_set, data_stats = build_datasets(tokenizer)
    log.info("data: %s", data_stats)
    on_cpu = next(model.parameters()).device.type == "cpu"
    args = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if cfg.eval_steps and val_set else "no",
        eval_steps=cfg.eval_steps or None,
        train_sampling_strategy="group_by_length" if stage == "sft" else "random",
        bf16=cfg.bf16,
        use_cpu=on_cpu,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=not on_cpu,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, pad_to_multiple_of=8)
    scored = takes_logits_to_keep(model)
    if not scored:
        log.info("%s takes no logits_to_keep: logits for every position", type(model.get_base_model()).__name__)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set or None,
        data_collator=ScoredLogitsCollator(collator) if scored else collator,
        processing_class=tokenizer,
        compute_loss_func=scored_loss if scored else None,
    )
    metrics: dict = {"stage": stage, "data": data_stats}
    if val_set:
        with model.disable_adapter():
            metrics["base_val_loss"] = trainer.evaluate()["eval_loss"]
        if cfg.init_adapter:
            metrics["init_val_loss"] = trainer.evaluate()["eval_loss"]
    last = get_last_checkpoint(str(out / CHECKPOINTS)) if cfg.resume and (out / CHECKPOINTS).is_dir() else None
    if last:
        log.info("resuming from %s", last)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    metrics["resumed_from"] = Path(last).name if last else None
    metrics["steps"] = trainer.state.global_step
    metrics["train_loss"] = result.training_loss
    tokens = trainer.state.num_input_tokens_seen
    metrics["tokens_seen"] = int(tokens)
    metrics["tokens_per_second"] = round(tokens / max(metrics["train_seconds"], 1e-9), 1)
    if val_set:
        metrics["val_loss"] = trainer.evaluate()["eval_loss"]
        for key in ("base_val_loss", "val_loss"):
            metrics[key.replace("loss", "perplexity")] = math.exp(metrics[key])
    metrics["device"] = "cpu" if on_cpu else torch.cuda.get_device_name(0)
    metrics["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.save_pretrained(str(out))
    # record the base as the user named it (PEFT would write the resolved cache path of this machine)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = cfg.model
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    (out / "training_config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
    write_loss_plot(trainer.state.log_history, out / "loss.png", title=f"{stage}: {cfg.model}")
    write_card(out, cfg, stage, metrics)
    log.info("adapter written to %s", out)
    return metrics, model
