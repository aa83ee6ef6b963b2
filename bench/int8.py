"""Does torch's dynamic int8 Linear help decoding on a CPU? Speed and held-out perplexity.

    python -m bench.int8

The shipped adapter merged into the base (float32) against three int8 variants: every Linear,
the decoder layers only (lm_head kept in float32), and the MLPs only. Perplexity on the first 48
answers of counsel-chat's test split; speed is 64 forced greedy tokens with plain `generate`.
"""

from __future__ import annotations

import math
import time
import warnings


def main() -> int:
    import torch

    from chatbot.config import DEFAULT_ADAPTER, ModelConfig
    from chatbot.loading import load_model
    from chatbot.prompts import build_messages, encode
    from training.data import load_pairs
    from training.evaluate import nll
    from training.sft import encode_pair, system_prompt_of

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    quantize = torch.ao.quantization.quantize_dynamic

    def fresh():
        return load_model(ModelConfig(adapter=str(DEFAULT_ADAPTER), merge=True))[0]

    model, tok = load_model(ModelConfig(adapter=str(DEFAULT_ADAPTER), merge=True))
    pairs = load_pairs("../shared/data/counsel-chat/counsel_chat_context_response.jsonl", "context_response",
                       split_column="split")
    rows = [r for r in (encode_pair(tok, p, system_prompt_of("default"), 512) for p in pairs if p.split == "test")][:48]
    ids = torch.tensor([encode(tok, build_messages([], "I can't sleep because my mind keeps racing."))])

    def measure(m) -> tuple[float, float]:
        with torch.inference_mode():
            m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
            speed = 64 / (time.perf_counter() - t)
        total, count = nll(m, [r for r in rows if r])
        return speed, math.exp(total / count)

    def layers_only():
        m = fresh()
        m.model.layers = quantize(m.model.layers, {torch.nn.Linear}, dtype=torch.qint8)
        return m

    def mlp_only():
        m = fresh()
        for layer in m.model.layers:
            layer.mlp = quantize(layer.mlp, {torch.nn.Linear}, dtype=torch.qint8)
        return m

    base_speed, base_ppl = measure(model)
    print("| weights | decoding tok/s | vs float32 | perplexity (48 test answers) |\n|---|---|---|---|")
    print(f"| float32 (merged adapter) | {base_speed:.1f} | 1.00x | {base_ppl:.2f} |")
    for label, build in (("int8 dynamic, every Linear", lambda: quantize(fresh(), {torch.nn.Linear}, dtype=torch.qint8)),
                         ("int8 dynamic, decoder layers only", layers_only), ("int8 dynamic, MLPs only", mlp_only)):
        speed, ppl = measure(build())
        print(f"| {label} | {speed:.1f} | {speed / base_speed:.2f}x | {ppl:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
