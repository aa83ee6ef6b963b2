"""Base vs adapter on held-out Q/A pairs; writes report.md and report.json.

    python -m training evaluate --config training/recipes/smollm2-135m/evaluate.yaml

- perplexity of each model on the reference answers (loss on the answer tokens only, as in SFT);
- semantic similarity (MiniLM cosine) of each model's greedy answer to the reference answers of
  the same question;
- sample answers side by side;
- safety regression: both models answer crisis prompts and the safety layer's output check
  screens the replies (fewer blocked replies is better).
One base model is loaded; the app's ChatEngine answers (greedy), with the adapter switched off
for the base model's turns.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

from .config import EvaluateConfig
from .data import DataError, load_pairs
from .sft import IGNORE, encode_pair, messages_for, system_prompt_of

CRISIS_PROMPTS = Path(__file__).parent / "data" / "crisis_prompts.yaml"
log = logging.getLogger(__name__)


def nll(model, rows: list[dict], batch_size: int = 8) -> tuple[float, int]:
    """Summed negative log-likelihood of the target tokens, and how many there were."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for j, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[j, :n], mask[j, :n], labels[j, :n] = (torch.tensor(r[k]) for k in ("input_ids", "attention_mask", "labels"))
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift, target = logits[:, :-1], labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(shift.reshape(-1, shift.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
        total += loss.item()
        count += int((target != IGNORE).sum())
    return total, count


def run(cfg: EvaluateConfig) -> dict:
    import yaml
    from transformers import set_seed

    from chatbot.config import GenerationConfig, ModelConfig
    from chatbot.generation import BASE, ChatEngine
    from chatbot.loading import adapter_base, adapter_name, attach_adapter, load_base, resolve_adapter
    from safety.classifier import load_embedder

    set_seed(cfg.seed)
    pairs = load_pairs(cfg.data, cfg.preset, cfg.question_column, cfg.answer_column, None, cfg.split_column)
    if cfg.split_column:
        pairs = [p for p in pairs if p.split == cfg.split.lower()]
        if not pairs:
            raise DataError(f"{cfg.data}: no rows with {cfg.split_column} = {cfg.split!r}")
    if cfg.max_examples:
        pairs = pairs[: cfg.max_examples]
    adapter_dir = resolve_adapter(cfg.adapter)
    base = cfg.model or adapter_base(adapter_dir)
    model, tokenizer = load_base(ModelConfig(model=base, quantize=cfg.quantize, device=cfg.device))
    model = attach_adapter(model, str(adapter_dir))
    model.eval()
    system = system_prompt_of(cfg.system_prompt)

    rows = [r for r in (encode_pair(tokenizer, p, system, cfg.max_length) for p in pairs) if r is not None]
    by_question: dict[str, list[str]] = defaultdict(list)
    for p in pairs:
        by_question[p.question].append(p.answer)
    questions = list(by_question)[: cfg.generate_examples]
    crisis = yaml.safe_load(CRISIS_PROMPTS.read_text())["prompts"] if cfg.crisis_prompts else []

    report: dict = {"adapter": str(cfg.adapter), "base_model": base, "data": str(cfg.data), "split": cfg.split,
                    "pairs": len(pairs), "scored_pairs": len(rows), "questions_generated": len(questions)}
    answers: dict[str, list[str]] = {}
    crisis_replies: dict[str, list[str]] = {}
    # the app's engine answers, greedy; adapter BASE switches the adapter off for the base model's turns
    engine = ChatEngine(model, tokenizer)
    greedy = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=0)
    for name, adapter in (("base", BASE), ("finetuned", adapter_name(str(adapter_dir)))):
        log.info("%s: perplexity on %d answers, then %d + %d generated replies", name, len(rows), len(questions), len(crisis))
        with engine.lock, engine.use_adapter(adapter):
            total, count = nll(model, rows)
        report[f"{name}_perplexity"] = math.exp(total / max(count, 1))
        answers[name] = [engine.reply(messages_for(q, system), greedy, adapter) for q in questions]
        crisis_replies[name] = [engine.reply(messages_for(q, system), greedy, adapter) for q in crisis]
    report["target_tokens"] = count

    if questions:
        embedder = load_embedder()
        for name in answers:
            sims = []
            for q, a in zip(questions, answers[name]):
                vecs = embedder.encode([a, *by_question[q]], normalize_embeddings=True)
                sims.append(float((vecs[1:] @ vecs[0]).max()))
            report[f"{name}_similarity"] = sum(sims) / len(sims)
    if crisis:
        from safety.guard import Guard

        guard = Guard()
        for name, replies in crisis_replies.items():
            verdicts = [guard.check_output(r) for r in replies]
            report[f"{name}_crisis_replies_blocked"] = sum(v.crisis for v in verdicts)
        report["crisis_prompts"] = len(crisis)
    report["samples"] = [{"question": q, "reference": by_question[q][0], "base": answers["base"][i],
                          "finetuned": answers["finetuned"][i]} for i, q in enumerate(questions)]
    write_report(Path(cfg.output_dir), report)
    return {k: v for k, v in report.items() if k != "samples"}


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    metric_rows = [("perplexity on reference answers (lower is better)", "perplexity", ".2f"),
                   ("similarity to reference answers (MiniLM cosine)", "similarity", ".3f"),
                   (f"crisis-prompt replies blocked by the output check (of {report.get('crisis_prompts', 0)})",
                    "crisis_replies_blocked", "d")]
    lines = [f"# Evaluation: {report['adapter']} vs {report['base_model']}", "",
             f"Data: `{report['data']}` split `{report['split']}`: {report['scored_pairs']} answers scored, "
             f"{report['questions_generated']} questions answered by both (greedy).", "",
             "| metric | base | fine-tuned |", "|---|---|---|"]
    for label, key, fmt in metric_rows:
        if f"base_{key}" in report:
            lines.append(f"| {label} | {report[f'base_{key}']:{fmt}} | {report[f'finetuned_{key}']:{fmt}} |")
    lines += ["", "## Samples", ""]
    for s in report["samples"]:
        quote = lambda t: t.replace("\n", " ").replace("|", "/")  # noqa: E731
        lines += [f"**Question:** {quote(s['question'])}", "", f"- *base:* {quote(s['base'])}",
                  f"- *fine-tuned:* {quote(s['finetuned'])}", f"- *reference (therapist):* {quote(s['reference'])}", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
