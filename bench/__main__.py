"""Benchmark: start-up, decoding speed and safety-check latency, each beside a baseline.

    python -m bench [--tokens 64] [--json bench/results/bench.json]     (or: make bench)

- first start: GGUF -> safetensors conversion into an empty cache, the ONNX export (on a CPU with
  onnxruntime-genai), then load;
- later start: load from the converted cache;
- decoding: the torch engine on the default CPU format (int8 weight-only, the lean loop of
  chatbot/decoder.py; Compare and --backend torch) against plain `model.generate` (float32,
  greedy, same prompt and token count) in the same process, the same engine through `generate`,
  and the bandwidth ceiling of each format: bytes of weights read per token over a large array
  copy's speed; then the ONNX Runtime GenAI engine (chatbot/onnx_engine.py, the app's chat path
  on a CPU) with the same prompts, baseline and ceiling;
- compare: base and fine-tuned answers from one two-row batch against two answers one after the
  other and against one fine-tuned answer, same token counts: on the app's engines (on a CPU the
  ONNX pair model, against one answer on the ONNX chat path), then on the torch engine alone;
- the system prompt's kept keys and values (decoder.PREFIXES): every figure with the app's
  system prompt is taken after a warm-up reply, as in a running app; the time to first token and
  compare are also given cold, with nothing kept;
- safety: p50/p95 latency of input and output checks;
- training: useful tokens/s of SFT steps, the trainer's batching against naive fixed-length padding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path


def machine() -> str:
    """The CPU, its vector instructions (machines of one name differ: AVX2 alone, or AVX-512 with
    VNNI and BF16, with or without AMX tiles, which change kernels and their speed), cores, OS and
    Python."""
    cpu, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if "avx512f" in flags:
        extras = [name for flag, name in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"), ("amx_tile", "AMX"))
                  if flag in flags]
        named = ", ".join(extras[:-1]) + " and " + extras[-1] if len(extras) > 1 else "".join(extras)
        cpu += " (AVX-512" + (" with " + named if extras else "") + ")"
    elif "avx2" in flags:
        cpu += " (AVX2, no AVX-512)"
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def bench_startup() -> dict:
    """First start (GGUF conversion, and the ONNX export where the app decodes on ONNX) and a
    later start from the cache, for the base model: what the app loads before it is ready."""
    from chatbot.config import ModelConfig
    from chatbot.loading import load_model, load_onnx

    cfg = ModelConfig(adapter=None)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["CHATBOT_CACHE_DIR"] = cache
        try:
            t = time.perf_counter()
            load_model(cfg), load_onnx(cfg)
            first = time.perf_counter() - t
            t = time.perf_counter()
            load_model(cfg), load_onnx(cfg)
            later = time.perf_counter() - t
        finally:
            os.environ.pop("CHATBOT_CACHE_DIR")
    return {"first_start_s": first, "later_start_s": later}


def memory_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Best of a few large array copies: bytes copied per second (as in "a copy moves 15 GB/s")."""
    import numpy as np

    a = np.ones(mb * 2**20 // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def _engine_speed(engine, messages, tokens: int, repeats: int = 3) -> tuple[float, float]:
    """(tokens/s, time to first token) for the app's streaming engine, exactly `tokens` tokens;
    medians of `repeats` replies (one reply alone moved by a third between runs)."""
    from chatbot.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    engine.model.generation_config.min_new_tokens = tokens
    list(engine.stream(messages, dataclasses.replace(gen, max_new_tokens=4)))  # warm-up: the same search
    totals, firsts = [], []
    for _ in range(repeats):
        t, first = time.perf_counter(), None
        for _ in engine.stream(messages, gen):
            first = first or time.perf_counter() - t
        totals.append(time.perf_counter() - t)
        firsts.append(first)
    engine.model.generation_config.min_new_tokens = None
    return tokens / statistics.median(totals), statistics.median(firsts)


def _cold_first_token(engine, messages) -> float:
    """Time to first token with no system prompt kept (a fresh app's first reply)."""
    from chatbot import decoder
    from chatbot.config import GenerationConfig

    decoder.PREFIXES.clear()
    if engine.onnx is not None:
        engine.onnx.forget()
    t = time.perf_counter()
    next(iter(engine.stream(messages, GenerationConfig(max_new_tokens=8, temperature=0))))
    return time.perf_counter() - t


def bench_variants(tokens: int) -> dict:
    """The chat path with the shipped adapter hot-swapped and merged, and the guard's stream wrapper."""
    from chatbot.config import DEFAULT_ADAPTER, GenerationConfig, ModelConfig
    from chatbot.generation import ChatEngine
    from chatbot.loading import load_model
    from chatbot.prompts import build_messages
    from safety import Guard

    messages = build_messages([], "I've been feeling stressed about work and can't sleep. What can I do?")
    out = {}
    for label, merge in (("adapter_hot_swapped", False), ("adapter_merged", True)):
        model, tok = load_model(ModelConfig(adapter=str(DEFAULT_ADAPTER), merge=merge))
        out[f"{label}_tok_s"], out[f"{label}_ttft_s"] = _engine_speed(ChatEngine(model, tok, merged=merge), messages, tokens)
    # the output check's stream wrapper, on each engine: the same engine with and without guard.stream
    from chatbot.loading import load_onnx

    guard = Guard()
    guard.warm_up()
    onnx = load_onnx(ModelConfig(adapter=str(DEFAULT_ADAPTER), merge=True, backend="onnx"))
    fast = ChatEngine(model, tok, merged=True, onnx=onnx)  # the adapter's merged ONNX copy: the app's chat view
    out["onnx_adapter_tok_s"], out["onnx_adapter_ttft_s"] = _engine_speed(fast, messages, tokens)
    greedy = GenerationConfig(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    # the ONNX engine's figures are the ones the target is judged on: more pairs, so that the
    # median moves less between runs (single pairs move by -10 to +20%)
    for label, engine, repeats in (("", ChatEngine(model, tok, merged=True), 15), ("onnx_", fast, WRAPPER_PAIRS)):
        out[f"{label}stream_wrapper_overhead"], _, out[f"{label}stream_wrapper_overhead_iqr"] = _wrapper_overhead(
            engine, guard, messages, greedy, min_tokens=tokens, repeats=repeats)
    # the app's own settings (256 tokens at most, temperature 0.7, top-p 0.9, repetition penalty
    # 1.1), seeded so that both runs write the same reply
    app = GenerationConfig(seed=1234)
    (out["onnx_stream_wrapper_overhead_app"], out["app_reply_chars"],
     out["onnx_stream_wrapper_overhead_app_iqr"]) = _wrapper_overhead(
        fast, guard, messages, app, repeats=WRAPPER_PAIRS_APP)
    out["input_check_in_app_p50_ms"], out["input_check_in_app_p95_ms"] = _input_check_in_app(fast, guard, messages)
    out["other_language_check_in_app_p50_ms"], out["other_language_check_in_app_p95_ms"] = _input_check_in_app(
        fast, guard, messages, texts=OTHER_LANGUAGE_INPUTS)
    return out


IDLE_CHECKS, IDLE_PAUSE_S = 40, 0.5  # checks after a pause: how many, and the pause (the user typing)


def _timed_checks(check, texts: list[str], n: int, before=None) -> tuple[float, float]:
    """(p50, p95) ms of `n` calls of `check` over `texts` in turn; `before()` runs untimed before each."""
    ms = []
    for i in range(n):
        if before is not None:
            before()
        t = time.perf_counter()
        check(texts[i % len(texts)])
        ms.append((time.perf_counter() - t) * 1000)
    return _p50_p95(ms)


def _input_check_in_app(engine, guard, messages, texts: list[str] | None = None) -> tuple[float, float]:
    """(p50, p95) ms of the input check as the app meets it: after a reply has streamed the chat
    model's weights through the caches, and a pause while the user types. bench_safety times
    checks back to back, and after the pause alone."""
    from chatbot.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=32, temperature=0, repetition_penalty=1.0)

    def reply_then_pause():
        "".join(engine.stream(messages, gen))
        time.sleep(IDLE_PAUSE_S)

    return _timed_checks(guard.check_input, texts or SAFETY_INPUTS, IDLE_CHECKS, reply_then_pause)


WRAPPER_PAIRS, WRAPPER_PAIRS_APP = 31, 25  # the ONNX engine's pairs: 64-token reply, app settings


def _wrapper_overhead(engine, guard, messages, gen, min_tokens: int | None = None,
                      repeats: int = 3) -> tuple[float, int, list[float]]:
    """(overhead, reply length in characters, [first, third] quartile of the overhead): the time
    of a reply through guard.stream over the same reply without it, minus one, the median of
    `repeats` pairs (one pair moves by -10 to +20% on this shared machine), each pair in the
    other order from the one before."""
    engine.model.generation_config.min_new_tokens = min_tokens
    ratios, reply = [], ""

    def timed(wrapped: bool) -> float:
        nonlocal reply
        t = time.perf_counter()
        if wrapped:
            list(guard.stream(engine.stream(messages, gen)))
        else:
            reply = "".join(engine.stream(messages, gen))
        return time.perf_counter() - t

    try:
        list(engine.stream(messages, gen))  # warm-up
        for i in range(repeats):
            if i % 2:
                wrapped, plain = timed(True), timed(False)
            else:
                plain, wrapped = timed(False), timed(True)
            ratios.append(wrapped / plain)
    finally:
        engine.model.generation_config.min_new_tokens = None
    quartiles = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios) - 1, len(reply), [quartiles[0] - 1, quartiles[2] - 1]


def bench_training(max_lengths: tuple[int, ...] = (320, 1024), steps: int = 6) -> dict:
    """Useful (non-padding) tokens/s of SFT steps (forward, backward, optimizer) on the same
    examples, three ways: padding every row to max_length with the model's own loss (the naive
    baseline); length-grouped dynamic padding with the model's own loss; and what the trainer does,
    length-grouped with logits only at the scored positions (`training.trainer.scored_loss`).

    The three take turns batch by batch, so a slower stretch of the machine falls on all of them.
    320 is the CPU recipe's cut (65% of counsel-chat's replies are cut there, so rows are nearly
    full); 1024 is the GPU recipe's, which keeps 99% of the replies whole.
    """
    import torch
    from transformers import DataCollatorForSeq2Seq

    from training.config import SftConfig
    from training.sft import build_datasets
    from training.trainer import ScoredLogitsCollator, prepare_model, scored_loss

    def own_loss(model, batch):
        return model(**batch).loss

    def reply_loss(model, batch):
        labels = batch.pop("labels")
        return scored_loss(model(**batch), labels)

    out = {}
    for max_length in max_lengths:
        cfg = SftConfig(data="../shared/data/counsel-chat/counsel_chat_context_response.jsonl", preset="context_response",
                        split_column="split", group_column="questionID", max_length=max_length, batch_size=4)
        model, tok = prepare_model(cfg)
        train, _, _ = build_datasets(cfg, tok)
        # The trainer's group_by_length sorts megabatches of 50 batches by length and cuts them into
        # batches; here `steps` of those batches, drawn at random positions, and the same examples
        # in random order for the naive run.
        rng = random.Random(max_length)
        mega = sorted(rng.sample(range(len(train)), 50 * cfg.batch_size), key=lambda i: len(train[i]["input_ids"]))
        grouped = [i for b in rng.sample(range(50), steps) for i in mega[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
        shuffled = rng.sample(grouped, len(grouped))
        pad = dict(label_pad_token_id=-100, pad_to_multiple_of=8)
        ways = {  # label: (example order, collator, loss)
            "naive_fixed_length": (shuffled, DataCollatorForSeq2Seq(tok, padding="max_length", max_length=max_length,
                                                                    label_pad_token_id=-100), own_loss),
            "length_grouped_full_logits": (grouped, DataCollatorForSeq2Seq(tok, padding=True, **pad), own_loss),
            "length_grouped": (grouped, ScoredLogitsCollator(DataCollatorForSeq2Seq(tok, padding=True, **pad)),
                               reply_loss),
        }
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        model(**DataCollatorForSeq2Seq(tok)([train[mega[0]]])).loss.backward()  # warm-up, not timed
        opt.step()
        opt.zero_grad()
        useful, padded, seconds = (dict.fromkeys(ways, 0) for _ in range(3))
        for start in range(0, len(grouped), cfg.batch_size):
            for label, (order, collate, loss_of) in ways.items():
                batch = collate([train[i] for i in order[start : start + cfg.batch_size]])
                useful[label] += int(batch["attention_mask"].sum())
                padded[label] += batch["attention_mask"].numel()
                t = time.perf_counter()
                loss_of(model, batch).backward()
                opt.step()
                opt.zero_grad()
                seconds[label] += time.perf_counter() - t
        res = {}
        for label in ways:
            res[f"{label}_useful_tok_s"] = useful[label] / seconds[label]
            res[f"{label}_padding_share"] = 1 - useful[label] / padded[label]
        res["speedup"] = res["length_grouped_useful_tok_s"] / res["naive_fixed_length_useful_tok_s"]
        res["speedup_full_logits"] = (res["length_grouped_full_logits_useful_tok_s"]
                                      / res["naive_fixed_length_useful_tok_s"])
        out[str(max_length)] = res
    return out


def bytes_per_token(model) -> int:
    """Bytes of weights one decoding step reads: every Linear (int8 weights and scales counted as
    stored) and norm; of an embedding only one row, unless it is also the output head."""
    import torch

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for name in ("weight", "scales", "bias"):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and list(module.children()) == []:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


class TokenTimes:
    """A streamer that notes when each put() arrives: the prompt, then one per new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_rate(run, repeats: int = 3) -> float:
    """Tokens per second after the first new token (the prompt's prefill is the time to first
    token, reported on its own), the median of `repeats` runs (one run moves by 10-20% on this
    shared machine): `run(streamer)` generates with a TokenTimes streamer."""
    rates = []
    for _ in range(repeats):
        streamer = TokenTimes()
        run(streamer)
        rates.append((len(streamer.times) - 2) / (streamer.times[-1] - streamer.times[1]))
    return statistics.median(rates)


def _engine_decode_rate(engine, messages, tokens: int) -> float:
    import threading

    from chatbot.config import GenerationConfig

    gen = GenerationConfig(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    ids, _ = engine.prepare(messages)
    stop = threading.Event()
    engine.model.generation_config.min_new_tokens = tokens
    try:
        return decode_rate(lambda s: engine.start_generate(engine._generate_kwargs(ids, gen, stop), s, gen, stop)[0].join())
    finally:
        engine.model.generation_config.min_new_tokens = None


def bench_decoding(tokens: int) -> dict:
    """Plain float32 `generate` against the app's engine on the default format (auto: int8 on CPU)."""
    import torch

    from chatbot.config import ModelConfig
    from chatbot.generation import ChatEngine
    from chatbot.loading import load_model
    from chatbot.prompts import build_messages

    text = "I've been feeling stressed about work and can't sleep. What can I do?"
    messages = build_messages([], text)
    fp32, tok = load_model(ModelConfig(adapter=None, quantize="none"))
    model, _ = load_model(ModelConfig(adapter=None))
    engine = ChatEngine(model, tok)
    ids, _ = engine.prepare(messages)
    input_ids = torch.tensor([ids])
    common = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        fp32.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm-up
        times = []
        for _ in range(3):  # the median of three, as for the engines (_engine_speed)
            t = time.perf_counter()
            fp32.generate(input_ids, attention_mask=torch.ones_like(input_ids), **common)
            times.append(time.perf_counter() - t)
        baseline = statistics.median(times)
        baseline_rate = decode_rate(lambda s: fp32.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                                            streamer=s, **common))
    speed, first = _engine_speed(engine, messages, tokens)
    rate = _engine_decode_rate(engine, messages, tokens)
    os.environ["CHATBOT_DECODER"] = "transformers"  # the same engine and weights through `generate`
    via_generate, _ = _engine_speed(engine, messages, tokens)
    os.environ.pop("CHATBOT_DECODER")
    short = [{"role": "user", "content": text}]  # no system prompt: about 50 tokens
    _, first_short = _engine_speed(engine, short, 8)
    first_cold = _cold_first_token(engine, messages)
    bandwidth = memory_bandwidth_gbs()
    out = {"prompt_tokens": len(ids), "short_prompt_tokens": len(engine.prepare(short)[0]), "new_tokens": tokens,
           "format": "int8 weight-only" if type(model.lm_head).__name__ == "Int8Linear" else str(model.dtype),
           "baseline_generate_tok_s": tokens / baseline, "engine_stream_tok_s": speed,
           "engine_via_generate_tok_s": via_generate, "baseline_decode_tok_s": baseline_rate,
           "engine_decode_tok_s": rate, "decode_ratio_vs_baseline": rate / baseline_rate,
           "ratio_vs_baseline": speed * baseline / tokens, "time_to_first_token_s": first,
           "time_to_first_token_cold_s": first_cold,
           "time_to_first_token_short_s": first_short, "bandwidth_gb_s": bandwidth}
    for label, m in (("fp32", fp32), ("engine", model)):
        out[f"{label}_mb_per_token"] = bytes_per_token(m) / 1e6
        out[f"{label}_ceiling_tok_s"] = bandwidth * 1e9 / bytes_per_token(m)
    out["share_of_ceiling"] = rate / out["engine_ceiling_tok_s"]  # decoding proper: after the prompt
    out["fp32_share_of_ceiling"] = baseline_rate / out["fp32_ceiling_tok_s"]
    out.update(_onnx_decoding(model, tok, messages, short, tokens, baseline, baseline_rate, bandwidth))
    return out


def _onnx_decoding(model, tok, messages, short, tokens, baseline, baseline_rate, bandwidth) -> dict:
    """The same figures for the ONNX Runtime GenAI engine (the app's chat path on a CPU)."""
    from chatbot import onnx_engine
    from chatbot.config import ModelConfig
    from chatbot.generation import BASE, ChatEngine
    from chatbot.loading import load_onnx

    onnx = load_onnx(ModelConfig(adapter=None, backend="onnx"))
    engine = ChatEngine(model, tok, onnx=onnx)
    speed, first = _engine_speed(engine, messages, tokens)
    rate = _engine_decode_rate(engine, messages, tokens)
    _, first_short = _engine_speed(engine, short, 8)
    mb = onnx_engine.bytes_per_token(onnx.folders[BASE]) / 1e6
    ceiling = bandwidth * 1e3 / mb
    return {"onnx_stream_tok_s": speed, "onnx_ratio_vs_baseline": speed * baseline / tokens,
            "onnx_decode_tok_s": rate, "onnx_decode_ratio_vs_baseline": rate / baseline_rate,
            "onnx_time_to_first_token_s": first, "onnx_time_to_first_token_short_s": first_short,
            "onnx_time_to_first_token_cold_s": _cold_first_token(engine, messages),
            "onnx_mb_per_token": mb, "onnx_ceiling_tok_s": ceiling, "onnx_share_of_ceiling": rate / ceiling}


def bench_compare(tokens: int, repeats: int = 3, backend: str = "auto") -> dict:
    """Compare's two answers against one fine-tuned answer, on the app's engines: with backend
    auto on a CPU, one answer on the ONNX chat path (system prompt kept) and the pair on the ONNX
    pair model (onnx_pair.py); with backend torch, both on the torch engine."""
    from chatbot import decoder
    from chatbot.compare import stream_pair
    from chatbot.config import DEFAULT_ADAPTER, GenerationConfig, ModelConfig
    from chatbot.generation import BASE, ChatEngine
    from chatbot.loading import load_model, load_onnx
    from chatbot.prompts import build_messages

    cfg = ModelConfig(adapter=str(DEFAULT_ADAPTER), backend=backend)
    model, tok = load_model(cfg)
    engine = ChatEngine(model, tok, onnx=load_onnx(cfg))
    engine.add_pairs()  # as the app's warm-up does
    name = [a for a in engine.adapters if a != BASE][0]
    engine_name = "onnx" if engine.onnx_pair((BASE, name)) else "torch"
    messages = build_messages([], "I feel anxious before every meeting at work. How can I calm down?")
    gen = GenerationConfig(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    model.generation_config.min_new_tokens = tokens  # every path writes exactly `tokens` per answer
    warm = GenerationConfig(max_new_tokens=4, temperature=0)
    runs = {BASE: lambda g: list(engine.stream(messages, g, adapter=BASE)),
            name: lambda g: list(engine.stream(messages, g, adapter=name)),
            "pair": lambda g: list(stream_pair(engine, messages, g, None, (BASE, name)))}
    for run in runs.values():  # warm-up; each keeps its system prompt, as in a running app
        run(warm)

    def timed(label: str, clear: bool, settings: GenerationConfig = gen) -> float:
        if clear:
            decoder.PREFIXES.clear()
            if engine.onnx is not None:
                engine.onnx.forget()
        t = time.perf_counter()
        runs[label](settings)
        return time.perf_counter() - t

    # the median of three of each, interleaved, so that a slow moment on a shared machine does
    # not land on one side only; every warm run before the first cold one (a cold run empties
    # what the warm ones reuse)
    times = {label: [] for label in runs}
    cold = {name: [], "pair": []}
    for _ in range(repeats):
        for label in runs:
            times[label].append(timed(label, clear=False))
    for _ in range(repeats):
        for label in cold:
            cold[label].append(timed(label, clear=True))
    # the app's sampling settings (temperature 0.7, top-p 0.9, repetition penalty 1.1), unseeded as
    # in the app so that the system prompt stays kept; the same forced length
    sampled_gen = GenerationConfig(max_new_tokens=tokens)
    sampled = {name: [], "pair": []}
    for _ in range(repeats):
        for label in sampled:
            sampled[label].append(timed(label, clear=False, settings=sampled_gen))
    times = {label: statistics.median(v) for label, v in times.items()}
    cold = {label: statistics.median(v) for label, v in cold.items()}
    sampled = {label: statistics.median(v) for label, v in sampled.items()}
    model.generation_config.min_new_tokens = None
    sequential, batched = times[BASE] + times[name], times["pair"]
    return {"engine": engine_name, "tokens_per_answer": tokens, "single_fine_tuned_s": times[name],
            "sequential_s": sequential, "batched_s": batched, "speedup": sequential / batched,
            "vs_single": batched / times[name], "single_fine_tuned_cold_s": cold[name], "batched_cold_s": cold["pair"],
            "vs_single_cold": cold["pair"] / cold[name], "single_fine_tuned_sampled_s": sampled[name],
            "batched_sampled_s": sampled["pair"], "vs_single_sampled": sampled["pair"] / sampled[name],
            "repeats": repeats,
            "steps": pair_steps(engine.onnx.folders[BASE], engine.onnx.folders[("pair", name)]) if engine_name == "onnx" else None}


def pair_steps(base_folder: Path, pair_folder: Path, past: int = 170, steps: int = 40) -> dict:
    """One decoding step of Compare's graphs alone (no sampling, no Python loop), medians of
    `steps` interleaved steps after `past` positions: the base model's graph with one row and
    with two, and the pair model's two rows (the base graph with the LoRA paths). Two rows of
    the base graph are the least a batch of two can cost on this CPU; the pair's step beyond
    them is the LoRA paths'."""
    import numpy as np
    import onnxruntime as ort

    from chatbot.onnx_engine import threads
    from chatbot.onnx_pair import SCALE, session

    decoder = json.loads((Path(base_folder) / "genai_config.json").read_text())["model"]["decoder"]
    layers, heads, dim = decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]

    def stepper(folder: Path, rows: int, scale: bool):
        graph = session(folder, threads())  # as the pair decoder runs it
        binding, buffers = graph.io_binding(), []
        for i in range(layers):
            for name in ("key", "value"):
                buffers.append(np.zeros((rows, heads, past + steps + 8, dim), np.float32))
                value = ort.OrtValue.ortvalue_from_numpy(buffers[-1])
                binding.bind_ortvalue_input(f"past_key_values.{i}.{name}", value)
                binding.bind_ortvalue_output(f"present.{i}.{name}", value)
        state = {"at": past}

        def step() -> float:
            binding.bind_cpu_input("input_ids", np.full((rows, 1), 100, np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((rows, state["at"] + 1), np.int64))
            if scale:
                binding.bind_cpu_input(SCALE, np.array([0.0, 1.0][:rows], np.float32).reshape(rows, 1, 1))
            binding.bind_output("logits")
            t = time.perf_counter()
            graph.run_with_iobinding(binding)
            state["at"] += 1
            return time.perf_counter() - t

        return step

    runs = {"base_one_row_ms": stepper(base_folder, 1, False), "base_two_rows_ms": stepper(base_folder, 2, False),
            "pair_two_rows_ms": stepper(pair_folder, 2, True)}
    for run in runs.values():
        run()
    times = {label: [] for label in runs}
    for _ in range(steps):
        for label, run in runs.items():
            times[label].append(run())
    out = {label: statistics.median(v) * 1e3 for label, v in times.items()}
    return {**out, "past": past, "steps": steps}


def _compare_rows(c: dict) -> list[str]:
    where = ("ONNX pair model, the app's Compare on a CPU; one answer on the ONNX chat path" if c["engine"] == "onnx"
             else "torch engine, both sides")
    return [f"| compare ({where}): two {c['tokens_per_answer']}-token answers, one two-row batch | {c['batched_s']:.2f} s | one after the other {c['sequential_s']:.2f} s | {c['speedup']:.2f}x faster |",
            f"| compare ({where}): two answers against one (median of {c['repeats']}) | {c['batched_s']:.2f} s | one fine-tuned answer {c['single_fine_tuned_s']:.2f} s | {c['vs_single']:.2f}x the time |",
            f"| compare ({where}), cold (nothing kept): two answers against one | {c['batched_cold_s']:.2f} s | one fine-tuned answer {c['single_fine_tuned_cold_s']:.2f} s | {c['vs_single_cold']:.2f}x the time |",
            f"| compare ({where}), the app's sampling settings: two answers against one | {c['batched_sampled_s']:.2f} s | one fine-tuned answer {c['single_fine_tuned_sampled_s']:.2f} s | {c['vs_single_sampled']:.2f}x the time |"
            ] + _step_rows(c.get("steps"))


def _step_rows(s: dict | None) -> list[str]:
    if not s:
        return []
    at = f"one decoding step after {s['past']} positions, the graph alone (median of {s['steps']})"
    return [f"| compare, {at}: two rows of the base model's graph, the least a batch of two costs here | {s['base_two_rows_ms']:.1f} ms | one row {s['base_one_row_ms']:.1f} ms | {s['base_two_rows_ms'] / s['base_one_row_ms']:.2f}x the time |",
            f"| compare, {at}: the pair model's two rows (with the LoRA paths) | {s['pair_two_rows_ms']:.1f} ms | two rows of the base model's graph {s['base_two_rows_ms']:.1f} ms | {s['pair_two_rows_ms'] / s['base_two_rows_ms']:.2f}x the time |"]


def _compare_only(path: str, tokens: int) -> int:
    """`python -m bench --only compare`: Compare on the app's engine and on the torch engine."""
    result = {"machine": machine(), "compare": bench_compare(tokens), "compare_torch": bench_compare(tokens, backend="torch")}
    print(f"Machine: {result['machine']}")
    print("| measure | value | baseline | ratio |\n|---|---|---|---|")
    for row in _compare_rows(result["compare"]) + _compare_rows(result["compare_torch"]):
        print(row)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


SAFETY_INPUTS = ["I've been feeling a bit low this week and I'm not sure why.", "I want to kill myself",
                 "how do I kill a python process", "My exams are next week and I'm stressed."]
# read by the multilingual heads (safety/multilingual.py)
OTHER_LANGUAGE_INPUTS = ["Me siento un poco triste esta semana y no sé por qué.", "je veux mourir",
                         "wie beende ich einen Python-Prozess", "Ik heb volgende week examens en ik ben gestrest."]
# replies read by the multilingual output head and the lexicon's entries in those languages (stop 38)
OTHER_LANGUAGE_OUTPUTS = ["Parece que has tenido mucho encima estos días. ¿Qué te ha ayudado antes?",
                          "Wenn du an Suizid denkst, ruf bitte die Telefonseelsorge an: 0800 111 0 111."]
# 20 to 60 words: scored by the post head, on MiniLM and e5 together where e5 runs (classifier.JOINT_POST)
LONG_INPUTS = [
    "My partner and I keep arguing about money. She wants to save for a house and I want to travel while we "
    "still can. Every conversation ends with one of us walking out. How do we talk about this without fighting?",
    "I've been sleeping badly for weeks and I can't concentrate at work. My manager has noticed and I'm scared "
    "of losing my job. I don't know whether this is stress or something more. Where do I start?",
    "Ever since my dad died last spring I've felt numb. I go to work, I come home, I watch TV. My friends keep "
    "inviting me out but I always say no. Is this normal grief or should I be worried about myself?"]


def _p50_p95(ms: list[float]) -> tuple[float, float]:
    ms = sorted(ms)
    return statistics.median(ms), ms[int(0.95 * (len(ms) - 1))]


def bench_safety(n: int = 60) -> dict:
    from safety import Guard

    guard = Guard()
    guard.warm_up()
    inputs = SAFETY_INPUTS
    outputs = ["It sounds like you've had a lot on your plate. What has helped you before?",
               "If you are thinking about suicide, please call or text 988."]
    res = {}
    for stage, texts, fn in (("input", inputs, guard.check_input), ("output", outputs, guard.check_output),
                             ("other_language", OTHER_LANGUAGE_INPUTS, guard.check_input),
                             ("other_language_output", OTHER_LANGUAGE_OUTPUTS, guard.check_output),
                             ("long_input", LONG_INPUTS, guard.check_input)):
        res[f"{stage}_p50_ms"], res[f"{stage}_p95_ms"] = _timed_checks(fn, texts, n)
    # The control for the in-app row (bench_variants): the same pause with no reply before it. Where
    # this is as slow as the in-app figure, the cost is the idle machine's (a cold core and caches),
    # not the chat model's weights pushing MiniLM's out of the caches.
    for stage, texts in (("input", inputs), ("other_language", OTHER_LANGUAGE_INPUTS)):
        res[f"{stage}_after_pause_p50_ms"], res[f"{stage}_after_pause_p95_ms"] = _timed_checks(
            guard.check_input, texts, IDLE_CHECKS, lambda: time.sleep(IDLE_PAUSE_S))
    return res


def _after_pause_row(g: dict, stage: str = "input") -> str:
    what = "input check" if stage == "input" else "input check in another language"
    return (f"| {what} p50 / p95 after a {IDLE_PAUSE_S} s pause, no reply before it ({IDLE_CHECKS} checks) | "
            f"{g[stage + '_after_pause_p50_ms']:.1f} / {g[stage + '_after_pause_p95_ms']:.1f} ms | back to back "
            f"{g[stage + '_p95_ms']:.1f} ms (p95) | {g[stage + '_after_pause_p95_ms'] / g[stage + '_p95_ms']:.1f}x |")


def _long_input_row(g: dict) -> str:
    words = sorted(len(t.split()) for t in LONG_INPUTS)
    return (f"| input check of a {words[0]}-to-{words[-1]}-word message (post head) p50 / p95, back to back | "
            f"{g['long_input_p50_ms']:.1f} / {g['long_input_p95_ms']:.1f} ms | short message {g['input_p95_ms']:.1f} ms (p95) | "
            f"{g['long_input_p95_ms'] / g['input_p95_ms']:.1f}x |")


def _safety_only(json_path: str) -> int:
    """`python -m bench --only safety`: the checks back to back, without loading a chat model."""
    result = {"machine": machine(), "safety": bench_safety()}
    g = result["safety"]
    print(f"Machine: {result['machine']}")
    print("| measure | value | baseline | ratio |\n|---|---|---|---|")
    for stage, what in (("input", "input check"), ("output", "output check"),
                        ("other_language", "input check in another language"),
                        ("other_language_output", "output check of a reply in another language")):
        print(f"| {what} p50 / p95, back to back | {g[stage + '_p50_ms']:.1f} / {g[stage + '_p95_ms']:.1f} ms | | |")
    print(_long_input_row(g))
    print(_after_pause_row(g))
    print(_after_pause_row(g, "other_language"))
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", default="bench/results/bench.json")
    p.add_argument("--only", choices=["safety", "compare"],
                   help="safety: only the safety checks' back-to-back latencies (a minute); compare: only Compare (two minutes)")
    args = p.parse_args()
    if args.only == "safety":
        return _safety_only(args.json)
    if args.only == "compare":
        return _compare_only(args.json, args.tokens)
    import torch

    result = {"machine": machine(), "torch_threads": torch.get_num_threads(), "startup": bench_startup(),
              "decoding": bench_decoding(args.tokens), "variants": bench_variants(args.tokens),
              "compare": bench_compare(args.tokens), "compare_torch": bench_compare(args.tokens, backend="torch"),
              "safety": bench_safety(), "training": bench_training()}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s, d, g, c = result["startup"], result["decoding"], result["safety"], result["compare"]
    v, tr = result["variants"], result["training"]
    print(f"Machine: {result['machine']}")
    print("| measure | value | baseline | ratio |\n|---|---|---|---|")
    print(f"| first start (GGUF conversion + ONNX export + load) | {s['first_start_s']:.1f} s | | |")
    print(f"| later start (load from cache) | {s['later_start_s']:.2f} s | first start | {s['first_start_s'] / s['later_start_s']:.0f}x faster |")
    print(f"| decoding after the first token, torch engine ({d['format']}) | {d['engine_decode_tok_s']:.1f} tok/s | plain float32 generate {d['baseline_decode_tok_s']:.1f} tok/s | {d['decode_ratio_vs_baseline']:.2f}x |")
    print(f"| whole reply, {d['prompt_tokens']}-token prompt + {d['new_tokens']} tokens, torch engine ({d['format']}, text stream) | {d['engine_stream_tok_s']:.1f} tok/s | plain float32 generate {d['baseline_generate_tok_s']:.1f} tok/s | {d['ratio_vs_baseline']:.2f}x |")
    print(f"| decoding, same engine and weights through transformers `generate` (CHATBOT_DECODER=transformers) | {d['engine_via_generate_tok_s']:.1f} tok/s | torch engine | {d['engine_stream_tok_s'] / d['engine_via_generate_tok_s']:.2f}x faster with the lean loop |")
    print(f"| decoding ceiling, {d['format']}: {d['engine_mb_per_token']:.0f} MB read per token at {d['bandwidth_gb_s']:.1f} GB/s (array copy) | {d['engine_ceiling_tok_s']:.1f} tok/s | torch engine after the first token | {d['share_of_ceiling']:.0%} of ceiling |")
    print(f"| decoding after the first token, ONNX Runtime GenAI engine (int8, the app's chat path on a CPU) | {d['onnx_decode_tok_s']:.1f} tok/s | plain float32 generate {d['baseline_decode_tok_s']:.1f} tok/s | {d['onnx_decode_ratio_vs_baseline']:.2f}x |")
    print(f"| whole reply, {d['prompt_tokens']}-token prompt + {d['new_tokens']} tokens, ONNX engine (system prompt kept) | {d['onnx_stream_tok_s']:.1f} tok/s | plain float32 generate {d['baseline_generate_tok_s']:.1f} tok/s | {d['onnx_ratio_vs_baseline']:.2f}x |")
    print(f"| decoding ceiling, ONNX int8: {d['onnx_mb_per_token']:.0f} MB read per token at {d['bandwidth_gb_s']:.1f} GB/s | {d['onnx_ceiling_tok_s']:.1f} tok/s | ONNX engine after the first token | {d['onnx_share_of_ceiling']:.0%} of ceiling |")
    print(f"| time to first token, ONNX engine: {d['short_prompt_tokens']}-token prompt; {d['prompt_tokens']}-token prompt kept / cold | {d['onnx_time_to_first_token_short_s']:.2f} s; {d['onnx_time_to_first_token_s']:.2f} / {d['onnx_time_to_first_token_cold_s']:.2f} s | | |")
    print(f"| whole reply, shipped adapter, ONNX engine (merged copy) | {v['onnx_adapter_tok_s']:.1f} tok/s | plain generate (base) | {v['onnx_adapter_tok_s'] / d['baseline_generate_tok_s']:.2f}x |")
    iqr = lambda key: "middle half of pairs {:+.1%} to {:+.1%}".format(*v[key])  # noqa: E731
    print(f"| output-check stream wrapper on the ONNX engine, {d['new_tokens']}-token greedy reply, median of {WRAPPER_PAIRS} pairs | {v['onnx_stream_wrapper_overhead']:+.1%} | same engine without it | {iqr('onnx_stream_wrapper_overhead_iqr')} |")
    print(f"| output-check stream wrapper on the ONNX engine, the app's settings (seeded, {v['app_reply_chars']} characters), median of {WRAPPER_PAIRS_APP} pairs | {v['onnx_stream_wrapper_overhead_app']:+.1%} | same engine without it | {iqr('onnx_stream_wrapper_overhead_app_iqr')} |")
    print(f"| decoding ceiling, float32: {d['fp32_mb_per_token']:.0f} MB per token | {d['fp32_ceiling_tok_s']:.1f} tok/s | plain generate after the first token | {d['fp32_share_of_ceiling']:.0%} of ceiling |")
    print(f"| whole reply, shipped adapter hot-swapped | {v['adapter_hot_swapped_tok_s']:.1f} tok/s | plain generate (base) | {v['adapter_hot_swapped_tok_s'] / d['baseline_generate_tok_s']:.2f}x |")
    print(f"| whole reply, shipped adapter merged | {v['adapter_merged_tok_s']:.1f} tok/s | plain generate (base) | {v['adapter_merged_tok_s'] / d['baseline_generate_tok_s']:.2f}x |")
    print(f"| time to first token, {d['short_prompt_tokens']}-token prompt | {d['time_to_first_token_short_s']:.2f} s | | |")
    print(f"| time to first token, {d['prompt_tokens']}-token prompt (app's system prompt, kept) | {d['time_to_first_token_s']:.2f} s | cold, nothing kept {d['time_to_first_token_cold_s']:.2f} s | {d['time_to_first_token_cold_s'] / d['time_to_first_token_s']:.1f}x sooner |")
    print(f"| output-check stream wrapper, added to decoding time (torch engine) | {v['stream_wrapper_overhead']:+.1%} | same engine without it | |")
    for row in _compare_rows(c) + _compare_rows(result["compare_torch"]):
        print(row)
    print(f"| input check p50 / p95 | {g['input_p50_ms']:.1f} / {g['input_p95_ms']:.1f} ms | | |")
    print(f"| output check p50 / p95 | {g['output_p50_ms']:.1f} / {g['output_p95_ms']:.1f} ms | | |")
    print(f"| input check p50 / p95 as in the app: after a reply and a {IDLE_PAUSE_S} s pause | {v['input_check_in_app_p50_ms']:.1f} / {v['input_check_in_app_p95_ms']:.1f} ms | back to back (above) | |")
    print(_after_pause_row(g))
    print(f"| input check in another language (multilingual heads) p50 / p95, back to back; as in the app | {g['other_language_p50_ms']:.1f} / {g['other_language_p95_ms']:.1f} ms; {v['other_language_check_in_app_p50_ms']:.1f} / {v['other_language_check_in_app_p95_ms']:.1f} ms | | |")
    print(_after_pause_row(g, "other_language"))
    print(f"| output check of a reply in another language (multilingual head and lexicon) p50 / p95, back to back | {g['other_language_output_p50_ms']:.1f} / {g['other_language_output_p95_ms']:.1f} ms | | |")
    print(_long_input_row(g))
    for length, t in tr.items():
        naive = f"naive padding to {length} ({t['naive_fixed_length_padding_share']:.0%} padding): {t['naive_fixed_length_useful_tok_s']:.0f}"
        print(f"| SFT useful tokens/s, max_length {length}: length-grouped batches ({t['length_grouped_padding_share']:.0%} padding), logits only where scored (the trainer) | {t['length_grouped_useful_tok_s']:.0f} | {naive} | {t['speedup']:.2f}x |")
        print(f"| SFT useful tokens/s, max_length {length}: length-grouped batches, all logits | {t['length_grouped_full_logits_useful_tok_s']:.0f} | {naive} | {t['speedup_full_logits']:.2f}x |")
    print(f"| peak resident memory of the benchmark process (5 model loads; the app's is in make load) | {result['peak_rss_mb']:.0f} MB | | |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
