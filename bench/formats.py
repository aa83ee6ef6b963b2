"""Weight formats for CPU decoding: speed and held-out perplexity against float32.

    python -m bench.formats

The shipped adapter merged into the base, in each format: float32 (the reference), bfloat16
everywhere, int8 weight-only (chatbot.int8, what --quantize auto picks on a CPU for the torch
engine), torch's dynamic int8 (weights and activations), and the int8 ONNX Runtime GenAI export
(chatbot.onnx_engine, the app's CPU chat path; its own C++ loop instead of `generate`). Perplexity on the first 48 answers of counsel-chat's test split;
speed is 64 forced greedy tokens with plain `generate`, and prefill time for the same prompt.
Writes bench/results/formats.json.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path


def main() -> int:
    import torch

    from chatbot.config import DEFAULT_ADAPTER, ModelConfig
    from chatbot.int8 import quantize_int8
    from chatbot.loading import load_model
    from chatbot.prompts import build_messages, encode
    from training.data import load_pairs
    from training.evaluate import nll
    from training.sft import encode_pair, system_prompt_of

    from .__main__ import machine

    warnings.filterwarnings("ignore", category=DeprecationWarning)

    def fresh():
        return load_model(ModelConfig(adapter=str(DEFAULT_ADAPTER), merge=True, quantize="none"))[0]

    model, tok = load_model(ModelConfig(adapter=str(DEFAULT_ADAPTER), merge=True, quantize="none"))
    pairs = load_pairs("../shared/data/counsel-chat/counsel_chat_context_response.jsonl", "context_response",
                       split_column="split")
    rows = [r for r in (encode_pair(tok, p, system_prompt_of("default"), 512) for p in pairs if p.split == "test")]
    rows = [r for r in rows if r][:48]
    ids = torch.tensor([encode(tok, build_messages([], "I can't sleep because my mind keeps racing."))])

    def measure(m) -> dict:
        with torch.inference_mode():
            m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            t = time.perf_counter()
            m(ids)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
            speed = 64 / (time.perf_counter() - t)
        total, count = nll(m, rows)
        return {"tok_s": speed, "prefill_s": prefill, "perplexity": math.exp(total / count)}

    formats = {
        "float32": lambda: model,
        "bfloat16 (all weights and activations)": lambda: fresh().to(torch.bfloat16),
        "int8 weight-only (chatbot.int8)": lambda: quantize_int8(fresh()),
        "int8 dynamic (torch.ao, weights and activations)":
            lambda: torch.ao.quantization.quantize_dynamic(fresh(), {torch.nn.Linear}, dtype=torch.qint8),
    }
    results = {label: measure(build()) for label, build in formats.items()}
    from chatbot import onnx_engine
    from chatbot.loading import default_model_dir

    if onnx_engine.available():  # the app's chat path on a CPU: the same merged adapter, exported
        folder = onnx_engine.export(default_model_dir(), DEFAULT_ADAPTER)
        results["int8 ONNX Runtime GenAI (MatMulNBits, blocks of 32; the app's CPU chat path)"] = onnx_measure(
            folder, ids[0].tolist(), rows)
    ref = results["float32"]
    print(f"Machine: {machine()}; prompt {ids.shape[1]} tokens; perplexity on {len(rows)} test answers")
    print("| weights | decoding tok/s (generate) | vs float32 | prefill | perplexity | vs float32 |\n|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['tok_s']:.1f} | {r['tok_s'] / ref['tok_s']:.2f}x | {r['prefill_s']:.2f} s "
              f"| {r['perplexity']:.2f} | {r['perplexity'] / ref['perplexity'] - 1:+.1%} |")
    out = Path("bench/results/formats.json")
    out.write_text(json.dumps({"machine": machine(), "prompt_tokens": ids.shape[1], "answers": len(rows),
                               "formats": results}, indent=2) + "\n")
    return 0


def onnx_measure(folder: Path, prompt: list[int], rows: list[dict]) -> dict:
    """The same three figures for an exported ONNX GenAI model: 64 forced greedy tokens after the
    prompt, the prompt's prefill, and perplexity from the logits of every position."""
    import numpy as np
    import onnxruntime_genai as og

    from chatbot import onnx_engine
    from training.evaluate import IGNORE

    model = onnx_engine.load(folder)  # as the app loads it

    def generator(max_length: int, **options):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, **options)
        return og.Generator(model, params)

    generator(len(prompt) + 4).append_tokens(prompt)  # warm-up
    t = time.perf_counter()
    generator(len(prompt) + 1).append_tokens(prompt)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    g = generator(len(prompt) + 64, min_length=len(prompt) + 64)
    g.append_tokens(prompt)
    while not g.is_done():
        g.generate_next_token()
    speed = 64 / (time.perf_counter() - t)
    total, count = 0.0, 0
    for r in rows:
        g = generator(len(r["input_ids"]) + 1)
        g.append_tokens(r["input_ids"])
        logits = np.asarray(g.get_output("logits"), dtype=np.float64)[0, :-1]
        labels = np.asarray(r["labels"][1:])
        keep = labels != IGNORE
        top = logits.max(-1, keepdims=True)
        logp = logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))
        total -= float(logp[keep, labels[keep]].sum())
        count += int(keep.sum())
    return {"tok_s": speed, "prefill_s": prefill, "perplexity": math.exp(total / count)}


if __name__ == "__main__":
    raise SystemExit(main())
