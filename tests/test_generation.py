"""Generation plumbing on a tiny random model: prompts, trimming, streaming, stop, thinking."""

from __future__ import annotations

import threading

import pytest

from chatbot.config import GenerationConfig, ModelConfig
from chatbot.generation import ChatEngine, ThinkFilter
from chatbot.loading import load_model
from chatbot.prompts import SYSTEM_PROMPT, build_messages, fit_to_context


@pytest.fixture(scope="module")
def engine(tiny_dir):
    model, tok = load_model(ModelConfig(model=str(tiny_dir), adapter=None))
    return ChatEngine(model, tok, max_input_tokens=400)


def test_system_prompt_is_warm_and_says_ai():
    assert "AI" in SYSTEM_PROMPT and "not a therapist" in SYSTEM_PROMPT
    msgs = build_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "how are you")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]


def test_history_trimmed_from_oldest(tokenizer):
    history = []
    for i in range(30):
        history += [{"role": "user", "content": f"old message number {i} " * 5},
                    {"role": "assistant", "content": f"old reply {i} " * 5}]
    msgs = build_messages(history, "the newest message")
    ids, dropped = fit_to_context(tokenizer, msgs, max_tokens=300)
    text = tokenizer.decode(ids)
    assert len(ids) <= 300 and dropped > 0
    assert "the newest message" in text and SYSTEM_PROMPT[:40] in text
    assert "old message number 0 " not in text and "old message number 29" in text
    assert text.rstrip().endswith("assistant")  # generation prompt kept


def test_overlong_single_message_is_cut(tokenizer):
    msgs = build_messages([], "word " * 2000)
    ids, _ = fit_to_context(tokenizer, msgs, max_tokens=256)
    assert len(ids) <= 256


def test_shared_prefix_is_the_system_prompt_and_nothing_of_the_conversation(engine, monkeypatch):
    """Only the template's system part is kept between replies (decoder.PREFIXES): the same tokens
    in every conversation, ending where the first user turn begins; no system prompt, nothing kept."""
    from chatbot import decoder

    tok = engine.tokenizer
    first = build_messages([], "I feel low today")
    later = build_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "thanks")
    ids_first, ids_later = engine.prepare(first)[0], engine.prepare(later)[0]
    n = engine.shared_prefix(first, ids_first)
    assert n > 50 and engine.shared_prefix(later, ids_later) == n and ids_first[:n] == ids_later[:n]
    kept = tok.decode(ids_first[:n])
    assert SYSTEM_PROMPT in kept and kept.rstrip().endswith("user") and "low" not in kept
    assert engine.shared_prefix(first[1:], engine.prepare(first[1:])[0]) == 0
    assert engine.shared_prefix(build_messages([], "x", system_prompt="Be brief."), ids_first) == 0

    seen = []
    monkeypatch.setattr(decoder, "generate", lambda model, **kw: seen.append(kw["shared_prefix"]))
    list(engine.stream(first, GenerationConfig(max_new_tokens=2)))
    assert seen == [n]


def test_stream_yields_only_new_text(engine):
    msgs = build_messages([], "hello there")
    deltas = list(engine.stream(msgs, GenerationConfig(max_new_tokens=12, temperature=0)))
    reply = "".join(deltas)
    assert reply and "hello there" not in reply and "<|im_start|>" not in reply
    assert not engine.lock.locked()


def test_stop_event_halts_generation(engine):
    calls = {"n": 0}
    original = engine.model.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    engine.model.forward = counting
    try:
        stop = threading.Event()
        seen = 0
        for _ in engine.stream(build_messages([], "hi"), GenerationConfig(max_new_tokens=200, temperature=0), stop=stop):
            seen += 1
            if seen == 2:
                stop.set()
        assert calls["n"] < 10  # 200 were allowed; it stopped within a token or two
    finally:
        del engine.model.forward
    assert not engine.lock.locked()


def test_closing_the_stream_frees_the_model(engine):
    stream = engine.stream(build_messages([], "hi"), GenerationConfig(max_new_tokens=200, temperature=0))
    next(stream)
    stream.close()  # what happens when a client disconnects
    assert not engine.lock.locked()
    assert engine.reply(build_messages([], "again"), GenerationConfig(max_new_tokens=3, temperature=0)) is not None


def test_seed_makes_sampling_reproducible(engine):
    gen = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=123)
    msgs = build_messages([], "tell me something")
    assert engine.reply(msgs, gen) == engine.reply(msgs, gen)


@pytest.mark.parametrize("pieces", [
    ["<think>plan the answer</think>Hello", " there"],
    ["<thi", "nk>secret", " stuff</th", "ink>Hello there"],
    ["Hello", " there<think>hidden</think>"],
])
def test_think_filter_hides_thinking(pieces):
    f = ThinkFilter()
    out = "".join(f.feed(p) for p in pieces) + f.flush()
    assert out.strip() == "Hello there"
