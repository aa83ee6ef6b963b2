"""Training module: recipes, data loaders, the loss mask, SFT/domain runs, resume, merge, evaluate.

Runs on a tiny random Llama with the default model's real tokenizer and chat template.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from training.__main__ import main as cli
from training.config import STAGES, SftConfig, load_config
from training.data import DataError, Pair, dedup, load_pairs, load_text, split_pairs
from training.sft import IGNORE, encode_pair

RECIPES = sorted((Path(__file__).resolve().parent.parent / "training" / "recipes").rglob("*.yaml"))
QA = [(f"How do I cope with worry number {i}?", f"Try naming the worry, breathing slowly, and talking to someone. ({i})")
      for i in range(24)]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_parses(recipe):
    cfg = load_config(STAGES[recipe.stem], recipe)
    assert type(cfg) is STAGES[recipe.stem]


def test_recipes_cover_every_stage_for_cpu_and_qlora():
    names = {(p.parent.name, p.stem) for p in RECIPES}
    for folder in ("smollm2-135m", "qwen3-1.7b-qlora"):
        assert {(folder, s) for s in STAGES} <= names
    qlora = load_config(SftConfig, RECIPES[0].parent.parent / "qwen3-1.7b-qlora" / "sft.yaml")
    assert qlora.quantize == "4bit" and qlora.model == "Qwen/Qwen3-1.7B"


def test_unknown_keys_and_bad_values_are_rejected(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data: x.jsonl\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="unknown option.*learning_rat"):
        load_config(SftConfig, recipe)
    with pytest.raises(ValueError, match="lora_dropout"):
        load_config(SftConfig, None, {"data": "x.jsonl", "lora_dropout": 1.5})
    cfg = load_config(SftConfig, None, {"data": "x.jsonl", "max_steps": 3})
    assert cfg.max_steps == 3 and cfg.output_dir == "runs/adapter"


def test_cli_rejects_bad_option_with_clear_message(tmp_path, capsys):
    assert cli(["sft", "--data", str(tmp_path / "missing.jsonl"), "--preset", "nope"]) == 2
    assert "preset must be one of" in capsys.readouterr().err


# ---------------------------------------------------------------- data


def _write_pdf(path: Path, pages: list[list[str]]) -> None:
    """A minimal PDF with Helvetica text lines, written by hand (no PDF library needed)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for lines in pages:
        ops = "BT /F1 11 Tf 14 TL 50 780 Td " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
        objects.append(f"<< /Length {len(ops)} >>\nstream\n{ops}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Resources << /Font << /F1 3 0 R >> >> "
                       f"/Contents {len(objects)} 0 R >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)


def test_pdf_loader_cleans_headers_page_numbers_and_hyphenation(tmp_path):
    pdf = tmp_path / "book.pdf"
    pages = [["Psychology 2e", f"Stress {i} is the body's response to a chal-", f"lenge, part {i}.", str(i + 1)]
             for i in range(4)]
    _write_pdf(pdf, pages)
    text = load_text(pdf)
    assert "challenge, part 0." in text and "challenge, part 3." in text  # hyphenation undone
    assert "Psychology 2e" not in text  # running header on every page
    assert not any(line.strip().isdigit() for line in text.splitlines())  # page numbers gone


def test_text_loader_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="empty.txt.*empty"):
        load_text(empty)
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"not a pdf at all")
    with pytest.raises(DataError, match="broken.pdf"):
        load_text(broken)


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("name, rows, preset", [
    ("cc.jsonl", [{"Context": q, "Response": a} for q, a in QA[:3]], "context_response"),
    ("helios.csv", [{"human": q, "zen": a} for q, a in QA[:3]], "human_zen"),
    ("helios.jsonl", [{"text": f"<HUMAN>: {q}\n<ASSISTANT>: {a}"} for q, a in QA[:3]], "text_markers"),
    ("faq.csv", [{"Questions": q, "Answers": a} for q, a in QA[:3]], "questions_answers"),
    ("mine.json", [{"prompt": q, "completion": a} for q, a in QA[:3]], "columns"),
])
def test_each_pair_preset(tmp_path, name, rows, preset):
    path = _write(tmp_path / name, rows)
    kwargs = {"question_column": "prompt", "answer_column": "completion"} if preset == "columns" else {}
    pairs = load_pairs(path, preset, **kwargs)
    assert [(p.question, p.answer) for p in pairs] == QA[:3]
    if preset != "columns":
        assert [(p.question, p.answer) for p in load_pairs(path)] == QA[:3]  # 'auto' detects it


def test_pair_errors_name_file_and_line(tmp_path):
    missing = _write(tmp_path / "m.csv", [{"Context": "hi", "Reply": "hello"}])
    with pytest.raises(DataError, match=r"m.csv: cannot tell the layout"):
        load_pairs(missing)
    with pytest.raises(DataError, match=r"m.csv line 1 \(header\): no column 'Response'"):
        load_pairs(missing, "context_response")
    empty_cell = _write(tmp_path / "e.jsonl", [{"Context": "a", "Response": "b"}, {"Context": "c", "Response": " "}])
    with pytest.raises(DataError, match=r"e.jsonl line 2: empty 'Response'"):
        load_pairs(empty_cell)
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"Context": "a", "Response": "b"}\n{"Context": oops}\n')
    with pytest.raises(DataError, match=r"b.jsonl line 2: not valid JSON"):
        load_pairs(bad_json)
    latin = tmp_path / "l.csv"
    latin.write_bytes("Context,Response\nhi,\n".encode() + "caf\xe9,ok\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"l.csv line 3: not UTF-8"):
        load_pairs(latin)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("")
    with pytest.raises(DataError, match="blank.jsonl: the file is empty"):
        load_pairs(blank)
    with pytest.raises(DataError, match="not found"):
        load_pairs(tmp_path / "nope.jsonl")


def test_dedup_and_group_split():
    pairs = [Pair(q, a, group=q) for q, a in QA] + [Pair(QA[0][0], QA[0][1].upper() + "!", group=QA[0][0])]
    pairs += [Pair(QA[1][0], "A second, different answer.", group=QA[1][0])]
    unique, dropped = dedup(pairs)
    assert dropped == 1 and len(unique) == len(QA) + 1
    train, val = split_pairs(unique, val_fraction=0.3)
    assert train and val and len(train) + len(val) == len(unique)
    assert not {p.group for p in train} & {p.group for p in val}  # a question never in two splits
    by_column = [Pair("q1", "a", "g1", "train"), Pair("q2", "a", "g2", "val"), Pair("q3", "a", "g3", "test")]
    assert [p.question for p in split_pairs(by_column)[0]] == ["q1"]
    assert [p.question for p in split_pairs(by_column)[1]] == ["q2"]


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    answer = "That sounds really hard. What has helped you before?"
    row = encode_pair(tokenizer, Pair("I feel low today.", answer), "Be kind.", max_length=256)
    learned = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert tokenizer.decode(learned) == answer + "<|im_end|>"
    first = row["labels"].index(next(label for label in row["labels"] if label != IGNORE))
    assert tokenizer.decode(row["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert all(label == IGNORE for label in row["labels"][:first])
    assert row["labels"][first:] == row["input_ids"][first:]
    cut = encode_pair(tokenizer, Pair("I feel low today.", answer * 20), "Be kind.", max_length=64)
    assert len(cut["input_ids"]) == 64 and cut["labels"][-1] != IGNORE


def test_loss_on_scored_logits_only_equals_the_models_own_loss(tokenizer):
    """The trainer projects only the reply positions onto the vocabulary; loss and gradients must
    be the model's own, for rows of different lengths (padding) and with a LoRA adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq

    from conftest import make_tiny_model
    from training.trainer import ScoredLogitsCollator, scored_loss

    rows = [encode_pair(tokenizer, Pair(q, a * (i + 1)), "Be kind.", max_length=160) for i, (q, a) in enumerate(QA[:3])]
    batch = ScoredLogitsCollator(DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE))(rows)
    keep = batch.pop("logits_to_keep")
    assert keep.dtype == torch.bool and 0 < keep.sum() < keep.numel() / 2  # most positions are prompt or padding

    def loss_and_grads(scored: bool):
        torch.manual_seed(0)
        model = get_peft_model(make_tiny_model(len(tokenizer)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                            init_lora_weights=False))
        if scored:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            loss = scored_loss(model(**inputs, logits_to_keep=keep), batch["labels"])
        else:
            loss = model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    (own, own_grads), (ours, our_grads) = loss_and_grads(False), loss_and_grads(True)
    assert torch.allclose(own, ours, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(own_grads, our_grads))
    # with gradient accumulation the Trainer passes the count of the whole accumulated batch
    out, labels = SimpleNamespace(logits=torch.randn(5, 7)), torch.tensor([[IGNORE, 1, 2, IGNORE, 3, 4, 5]])
    assert torch.isclose(scored_loss(out, labels, num_items_in_batch=10), scored_loss(out, labels) / 2)


# ---------------------------------------------------------------- runs on a tiny model


def test_models_without_logits_to_keep_are_told_apart():
    """The trainer scores only the reply's logits where the forward takes logits_to_keep (through
    PEFT too); a forward without it (remote code) is recognised, and trains on every position."""
    from peft import LoraConfig, get_peft_model

    from conftest import make_tiny_model
    from training.trainer import takes_logits_to_keep

    model = make_tiny_model(64)
    assert takes_logits_to_keep(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])))
    older = type("OlderLM", (type(model),), {"forward": lambda self, input_ids=None, attention_mask=None, labels=None: None})
    assert not takes_logits_to_keep(older(model.config))


@pytest.fixture
def qa_file(tmp_path):
    return _write(tmp_path / "qa.jsonl", [{"Context": q, "Response": a} for q, a in QA])


def _sft_cfg(tiny_dir, qa_file, out, **kw):
    values = dict(model=str(tiny_dir), data=str(qa_file), output_dir=str(out), max_steps=2, batch_size=2,
                  max_length=96, logging_steps=1, save_steps=1, learning_rate=1e-2, lora_r=4, val_fraction=0.25,
                  system_prompt=None)
    values.update(kw)
    return SftConfig(**values)


def test_sft_steps_change_lora_weights_and_leave_base_untouched(tiny_dir, qa_file, tmp_path):
    from training.trainer import train
    from training.sft import build_datasets

    base = load_file(str(tiny_dir / "model.safetensors"))
    cfg = _sft_cfg(tiny_dir, qa_file, tmp_path / "run")
    metrics, model = train(cfg, "sft", lambda tok: build_datasets(cfg, tok))
    assert metrics["steps"] == 2
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p.detach(), base[key]), name
    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero


def test_cli_end_to_end_writes_a_self_describing_adapter(tiny_dir, qa_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    args = ["sft", "--config", str(RECIPES[0].parent.parent / "smollm2-135m" / "sft.yaml"), "--model", str(tiny_dir),
            "--data", str(qa_file), "--preset", "auto", "--split-column", "null", "--group-column", "null",
            "--init-adapter", "null", "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2",
            "--max-length", "192", "--val-fraction", "0.25"]
    assert cli(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["data"]["train_examples"] > 0
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_config.json", "metrics.json",
                 "loss.png", "README.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "training_config.json").read_text())["max_steps"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
    assert "not a therapist" in (out / "README.md").read_text()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert cli(args) == 2  # a finished adapter is never overwritten silently
    assert "--overwrite" in capsys.readouterr().err


def test_domain_cli_packs_text(tiny_dir, tmp_path, capsys):
    text = tmp_path / "notes.md"
    text.write_text("\n\n".join(f"Paragraph {i}: stress and coping skills, sleep and exercise." for i in range(80)))
    out = tmp_path / "domain"
    assert cli(["domain", "--model", str(tiny_dir), "--data", str(text), "--output-dir", str(out), "--max-steps", "2",
                "--max-length", "64", "--batch-size", "2", "--val-fraction", "0.1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["tokens_seen"] == 2 * 2 * 64  # packed: no padding at all
    assert (out / "adapter_model.safetensors").is_file()


def test_resume_continues_the_step_count(tiny_dir, qa_file, tmp_path):
    from training.sft import run

    out = tmp_path / "resumable"
    run(_sft_cfg(tiny_dir, qa_file, out, max_steps=2))
    (out / "adapter_model.safetensors").unlink()  # as if the run died before its final save
    metrics = run(_sft_cfg(tiny_dir, qa_file, out, max_steps=4))
    assert metrics["resumed_from"] == "checkpoint-2" and metrics["steps"] == 4


def test_merge_matches_unmerged_logits(tiny_dir, qa_file, tmp_path):
    from chatbot.config import ModelConfig
    from chatbot.loading import load_model
    from training.merge import run as merge
    from training.sft import run as sft
    from training.config import MergeConfig

    adapter = tmp_path / "adapter"
    sft(_sft_cfg(tiny_dir, qa_file, adapter, max_steps=3, learning_rate=5e-2))
    merged = tmp_path / "merged"
    info = merge(load_config(MergeConfig, None, {"adapter": str(adapter), "model": str(tiny_dir), "output_dir": str(merged)}))
    assert info["output_dir"] == str(merged)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    full = dict(quantize="none")  # exact comparison in float32 (int8 rounds merged and unmerged differently)
    base, _ = load_model(ModelConfig(model=str(tiny_dir), **full))
    peft, _ = load_model(ModelConfig(model=str(tiny_dir), adapter=str(adapter), **full))
    flat, _ = load_model(ModelConfig(model=str(merged), **full))
    with torch.no_grad():
        a, b, c = (m(ids).logits for m in (base, peft, flat))
    assert not torch.allclose(a, b, atol=1e-3)  # the adapter really changes the model
    torch.testing.assert_close(c, b, atol=1e-4, rtol=1e-4)


def test_evaluate_writes_report_comparing_base_and_adapter(tiny_dir, qa_file, tmp_path):
    from training.config import EvaluateConfig
    from training.evaluate import run as evaluate
    from training.sft import run as sft

    adapter = tmp_path / "adapter"
    sft(_sft_cfg(tiny_dir, qa_file, adapter, max_steps=3, learning_rate=5e-2))
    out = tmp_path / "eval"
    report = evaluate(EvaluateConfig(adapter=str(adapter), model=str(tiny_dir), data=str(qa_file), generate_examples=2,
                                     max_new_tokens=6, system_prompt=None, output_dir=str(out)))
    assert report["scored_pairs"] == len(QA) and report["questions_generated"] == 2
    assert report["base_perplexity"] != report["finetuned_perplexity"]
    assert report["crisis_prompts"] > 0 and 0 <= report["finetuned_crisis_replies_blocked"] <= report["crisis_prompts"]
    assert "| perplexity" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["samples"][0]["question"] == QA[0][0]


def test_qlora_trains_on_a_4bit_base(tiny_dir_4bit, qa_file, tmp_path):
    """bitsandbytes 0.50 runs NF4 on the CPU too, so the QLoRA path is exercised here."""
    import bitsandbytes as bnb

    from training.sft import build_datasets
    from training.trainer import train

    cfg = _sft_cfg(tiny_dir_4bit, qa_file, tmp_path / "qlora", quantize="4bit")
    metrics, model = train(cfg, "sft", lambda tok: build_datasets(cfg, tok))
    assert metrics["steps"] == 2
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # the base really is 4-bit
    saved = load_file(str(tmp_path / "qlora" / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert json.loads((tmp_path / "qlora" / "training_config.json").read_text())["quantize"] == "4bit"
