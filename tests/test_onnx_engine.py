"""The ONNX Runtime GenAI chat path (chatbot/onnx_engine.py) on the real default model: export once,
stream, stop, adapters, the kept system prompt, Compare's pair model (chatbot/onnx_pair.py), and
falling back to torch when it cannot serve."""

from __future__ import annotations

import threading

import pytest

from chatbot.config import DEFAULT_ADAPTER, GenerationConfig, ModelConfig
from chatbot.generation import BASE, ChatEngine
from chatbot.prompts import build_messages

pytest.importorskip("onnxruntime_genai")

GREEDY = GenerationConfig(max_new_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def onnx_engine(real_model):
    from chatbot.loading import load_onnx

    model, tok = real_model
    onnx = load_onnx(ModelConfig(adapter=None, backend="onnx"))
    onnx.add({"counsel": DEFAULT_ADAPTER})
    return ChatEngine(model, tok, onnx=onnx)


def ask(text: str) -> list[dict]:
    return build_messages([], text)


def test_export_is_made_once_and_reused(onnx_engine, default_model_dir):
    from chatbot import onnx_engine as oe

    folder = onnx_engine.onnx.folders[BASE]
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    assert oe.export(default_model_dir) == folder and (folder / "model.onnx").stat().st_mtime_ns == stamp
    assert oe.export(default_model_dir, DEFAULT_ADAPTER) == onnx_engine.onnx.folders["counsel"] != folder


def test_replies_stream_on_onnx_and_the_weights_are_int8(onnx_engine, monkeypatch):
    import numpy as np
    import onnx

    from chatbot import onnx_engine as oe

    calls = []
    monkeypatch.setattr(oe.OnnxModels, "generate", lambda self, *a, **k: calls.append(a[0]) or [])
    list(onnx_engine.stream(ask("hi"), GREEDY, adapter=BASE))
    assert calls == [BASE]  # the torch model did not decode it
    monkeypatch.undo()
    deltas = list(onnx_engine.stream(ask("I can't sleep before exams. Any tips?"), GREEDY, adapter=BASE))
    reply = "".join(deltas)
    assert len(deltas) > 3 and len(reply.split()) > 5 and "<|im_end|>" not in reply
    graph = onnx.load(str(onnx_engine.onnx.folders[BASE] / "model.onnx"), load_external_data=False).graph
    products = [n for n in graph.node if n.op_type == "MatMulNBits"]
    bits = {a.i for n in products for a in n.attribute if a.name == "bits"}
    assert len(products) == 30 * 4 + 1  # q/k/v fused, o, gate/up fused, down; the output head
    assert bits == {8} and oe.bytes_per_token(onnx_engine.onnx.folders[BASE]) < 0.3 * np.float32().nbytes * 135e6


def test_no_core_is_left_spinning_after_a_reply(onnx_engine):
    """After a reply the decoder's threads sleep at once (`onnx_engine.SPIN_US`): with ONNX
    Runtime's default they kept a core busy for about 40 ms of CPU time, beside the final output
    check and any other user's request. CPU time, not speed, is measured: the median of three."""
    import statistics
    import time

    burned = []
    for _ in range(3):
        list(onnx_engine.stream(ask("I can't sleep before exams. Any tips?"), GREEDY, adapter=BASE))
        start = time.process_time()
        time.sleep(0.2)
        burned.append(time.process_time() - start)
    assert statistics.median(burned) < 0.015, burned


def test_kept_system_prompt_changes_nothing_and_keeps_no_conversation(onnx_engine):
    onnx_engine.onnx.forget()
    first = onnx_engine.reply(ask("How do I calm down before a presentation?"), GREEDY, adapter=BASE)
    other = onnx_engine.reply(ask("My cat knocked over my plant again."), GREEDY, adapter=BASE)
    again = onnx_engine.reply(ask("How do I calm down before a presentation?"), GREEDY, adapter=BASE)
    assert first == again and first != other  # the kept generator starts each reply from the prefix
    messages = ask("My cat knocked over my plant again.")
    ids, _ = onnx_engine.prepare(messages)
    prefix = onnx_engine.shared_prefix(messages, ids)
    (generator, kept), = [v for k, v in onnx_engine.onnx._kept.items() if k[0] == BASE]
    assert 0 < prefix < len(ids) and kept == ids[:prefix] and generator.token_count() == prefix


def test_warm_up_leaves_only_the_system_prompt_in_the_kept_generator(onnx_engine, guard):
    from chatbot.service import ChatService

    onnx_engine.onnx.forget()
    ChatService(onnx_engine, guard, GenerationConfig()).warm_up()  # the app's default settings
    messages = ask("The first message after a start.")
    ids, _ = onnx_engine.prepare(messages)
    prefix = onnx_engine.shared_prefix(messages, ids)
    (generator, kept), = onnx_engine.onnx._kept.values()
    assert 0 < prefix and kept == ids[:prefix] and generator.token_count() == prefix
    onnx_engine.reply(messages, GenerationConfig(max_new_tokens=4))
    assert list(onnx_engine.onnx._kept.values()) == [(generator, kept)]  # the first reply used it


def test_adapter_and_base_are_different_onnx_models(onnx_engine):
    question = ask("I feel lonely since I moved to a new city.")
    base = onnx_engine.reply(question, GREEDY, adapter=BASE)
    tuned = onnx_engine.reply(question, GREEDY, adapter="counsel")
    assert base and tuned and base != tuned
    with pytest.raises(ValueError):
        onnx_engine.reply(question, GREEDY, adapter="not-loaded")  # not an ONNX model: the torch path says so


def test_stop_event_halts_onnx_decoding(onnx_engine):
    stop = threading.Event()
    deltas = []
    for delta in onnx_engine.stream(ask("Tell me a long story about a lighthouse."),
                                    GenerationConfig(max_new_tokens=200, temperature=0), stop=stop, adapter=BASE):
        deltas.append(delta)
        if len(deltas) == 2:
            stop.set()
    assert 2 <= len(deltas) <= 4


def test_seeded_sampling_is_reproducible_on_onnx(onnx_engine):
    gen = GenerationConfig(max_new_tokens=20, temperature=0.9, seed=7)
    question = ask("Give me one idea for a relaxing evening.")
    assert onnx_engine.reply(question, gen, adapter=BASE) == onnx_engine.reply(question, gen, adapter=BASE)


def test_auto_falls_back_to_torch_and_onnx_says_why(monkeypatch, tmp_path, caplog):
    from chatbot import onnx_engine as oe
    from chatbot.loading import ModelLoadError, load_onnx

    assert load_onnx(ModelConfig(adapter=None, backend="torch")) is None
    assert load_onnx(ModelConfig(adapter=None, quantize="none")) is None  # auto: only for int8 weights
    monkeypatch.setattr(oe, "available", lambda: False)
    assert load_onnx(ModelConfig(adapter=None)) is None
    with pytest.raises(ModelLoadError, match="onnxruntime-genai is not installed"):
        load_onnx(ModelConfig(adapter=None, backend="onnx"))
    monkeypatch.undo()
    (tmp_path / "config.json").write_text("{not json")  # an export that fails
    with caplog.at_level("WARNING"):
        assert load_onnx(ModelConfig(model=str(tmp_path), adapter=None)) is None
    assert "torch engine" in caplog.text


def test_adapter_added_while_running_gets_its_onnx_copy(default_model_dir, monkeypatch):
    from chatbot import onnx_engine as oe
    from chatbot.loading import load_model, load_onnx

    cfg = ModelConfig(adapter=None, backend="onnx")
    model, tok = load_model(cfg)
    engine = ChatEngine(model, tok, onnx=load_onnx(cfg))
    name = engine.add_adapter(str(DEFAULT_ADAPTER))
    assert name in engine.onnx and engine.onnx_name(name) == name
    assert engine.onnx_pair((BASE, name)) == name  # Compare's pair model too
    calls = []
    monkeypatch.setattr(oe.OnnxModels, "generate", lambda self, *a, **k: calls.append(a[0]) or [])
    list(engine.stream(ask("hello"), GREEDY, adapter=name))
    assert calls == [name]


@pytest.fixture(scope="module")
def pair_engine(onnx_engine):
    """The ONNX engine with Compare's pair model for the shipped adapter."""
    onnx_engine.onnx.add_pair("counsel", DEFAULT_ADAPTER)
    return onnx_engine


def _last_logits(model, ids: list[int], rows: int):
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 2, batch_size=rows)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([ids] * rows, dtype=np.int32))
    return np.array(generator.get_output("logits"))[:, -1, :]


def test_pair_model_rows_are_the_base_model_and_the_adapter(pair_engine, default_model_dir):
    """Row 0 of the pair is the base model's int8 graph (its LoRA path adds exactly zero), row 1
    the adapter as PEFT runs it on the float model, within int8 rounding: far nearer than the
    adapter's own effect, or half of it (a wrong scaling). A step of both rows in one batch gives
    what a step of each row alone gives: no row reads the other's keys, values or scale."""
    import numpy as np
    import onnx
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    onnx_models = pair_engine.onnx
    folder, base_folder = onnx_models.folders[("pair", "counsel")], onnx_models.folders[BASE]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 30 * 4 + 1  # the base export's products
    assert sum(n.name.endswith("/lora_pair/Add") for n in graph.node) == 30 * 4  # every one the adapter targets
    assert (folder / "model.onnx.data").stat().st_size == (base_folder / "model.onnx.data").stat().st_size

    pair = onnx_models.pairs["counsel"]
    ids = pair_engine.prepare(ask("I feel lonely since I moved to a new city."))[0]
    pair.forget()
    rows, _ = pair.prefill(ids, 0, 8)
    base_onnx = _last_logits(onnx_models.models[BASE], ids, 1)[0]
    float_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32),
                                            str(DEFAULT_ADAPTER))
    with torch.no_grad():
        tuned = float_model(torch.tensor([ids])).logits[0, -1].numpy()
        with float_model.disable_adapter():
            base = float_model(torch.tensor([ids])).logits[0, -1].numpy()
    distance = lambda a, b: float(np.linalg.norm(a - b))  # noqa: E731
    effect = distance(base, tuned)
    assert distance(rows[0], base_onnx) < 0.01 * effect
    assert distance(rows[1], tuned) < 0.1 * effect and distance(rows[0], base) < 0.1 * effect
    assert distance(rows[1], (base + tuned) / 2) > 0.3 * effect

    both = pair._run(0, [[ids[-1]], [ids[-1]]], len(ids) + 1, [0.0, 1.0])  # both rows, one batch
    pair.forget()
    pair.prefill(ids, 0, 8)
    alone = [pair._run(1 + row, [[ids[-1]]], len(ids) + 1, [float(row)])[0] for row in (0, 1)]  # a row at a time
    assert distance(both[0], alone[0]) < 1e-3 * effect and distance(both[1], alone[1]) < 1e-3 * effect
    pair.forget()


def test_compare_decodes_on_the_onnx_pair(pair_engine, monkeypatch):
    from chatbot import onnx_pair
    from chatbot.compare import stream_pair

    question = ask("How do I stop overthinking at night?")
    calls = []
    monkeypatch.setattr(onnx_pair, "generate", lambda model, pair, **k: calls.append(pair))
    monkeypatch.setattr(pair_engine.model, "generate", lambda *a, **k: pytest.fail("the torch model decoded"))
    monkeypatch.setattr("chatbot.decoder.generate", lambda *a, **k: pytest.fail("the torch engine decoded"))
    list(stream_pair(pair_engine, question, GREEDY, None, (BASE, "counsel")))
    assert calls == [pair_engine.onnx.pairs["counsel"]]
    monkeypatch.undo()
    texts = ["", ""]
    for row, delta in stream_pair(pair_engine, question, GREEDY, None, (BASE, "counsel")):
        texts[row] += delta
    base = pair_engine.reply(question, GREEDY, adapter=BASE)
    assert texts[0].strip().split()[:8] == base.split()[:8]  # row 0 is the base model
    assert texts[1].strip() and texts[1] != texts[0] and "<|im_end|>" not in texts[1]

    pair = pair_engine.onnx.pairs["counsel"]  # the system prompt is kept, and nothing after it
    ids, _ = pair_engine.prepare(question)
    prefix = pair_engine.shared_prefix(question, ids)
    assert 0 < prefix < len(ids) and pair.kept == ids[:prefix]
    assert all(not buffer[:, :, prefix:].any() for layer in pair.buffers for buffer in layer)
    assert all(buffer[:, :, :prefix].any() for layer in pair.buffers for buffer in layer)
    again = ["", ""]
    for row, delta in stream_pair(pair_engine, question, GREEDY, None, (BASE, "counsel")):
        again[row] += delta
    pair_engine.onnx.forget()
    cold = ["", ""]
    for row, delta in stream_pair(pair_engine, question, GREEDY, None, (BASE, "counsel")):
        cold[row] += delta
    assert again == texts and cold == texts  # the kept prompt changes nothing


def test_a_sampled_compare_on_the_pair_follows_its_seed(pair_engine):
    """At the app's sampling settings (the pair's lean sampling, `lean_sampling`), a seed gives
    the same two replies again, and another seed others."""
    from chatbot.compare import stream_pair

    question = ask("How can I sleep better before exams?")

    def both(seed):
        texts = ["", ""]
        gen = GenerationConfig(max_new_tokens=32, seed=seed)
        for row, delta in stream_pair(pair_engine, question, gen, None, (BASE, "counsel")):
            texts[row] += delta
        return texts

    first = both(5)
    assert all(t.strip() and "<|im_end|>" not in t for t in first)
    assert both(5) == first and both(6) != first


def test_bench_times_one_step_of_the_compare_graphs(pair_engine):
    """`make bench`'s step rows: the base graph with one row and two, and the pair's two rows,
    each a real run of the graph (the pair's needs its scale input)."""
    from bench.__main__ import _step_rows, pair_steps

    steps = pair_steps(pair_engine.onnx.folders[BASE], pair_engine.onnx.folders[("pair", "counsel")], past=20, steps=3)
    assert all(steps[k] > 0 for k in ("base_one_row_ms", "base_two_rows_ms", "pair_two_rows_ms"))
    rows = _step_rows(steps)
    assert len(rows) == 2 and "two rows of the base model's graph" in rows[0] and "LoRA paths" in rows[1]
    assert _step_rows(None) == []


def test_stop_event_halts_the_pair_and_a_failed_pair_leaves_compare_on_torch(pair_engine, monkeypatch, caplog):
    from chatbot import onnx_pair
    from chatbot.compare import stream_pair
    from chatbot.generation import add_pair

    stop, deltas = threading.Event(), []
    for item in stream_pair(pair_engine, ask("Tell me a long story about a lighthouse."),
                            GenerationConfig(max_new_tokens=200, temperature=0), stop, (BASE, "counsel")):
        deltas.append(item)
        if len(deltas) == 4:
            stop.set()
    assert 4 <= len(deltas) <= 8

    def unmappable(*args, **kwargs):
        raise onnx_pair.OnnxUnavailable("the pair model covers plain LoRA only")

    monkeypatch.setattr(onnx_pair, "export_pair", unmappable)
    with caplog.at_level("WARNING"):
        add_pair(pair_engine.onnx, "other", DEFAULT_ADAPTER)
    assert "Compare with other runs on the torch engine" in caplog.text and "other" not in pair_engine.onnx.pairs
    assert pair_engine.onnx_pair((BASE, "other")) is None and pair_engine.onnx_pair(("counsel", BASE)) is None


def test_the_app_loads_the_pair_in_its_warm_up_and_drops_one_that_fails(default_model_dir, guard, monkeypatch,
                                                                        caplog):
    """Not while it starts (about a second each, with the app not yet ready), but right after, in
    the warm-up, which then reads the system prompt into both rows. A pair that fails gives that
    Compare the error notice, and the next one runs on the torch engine."""
    from chatbot.compare import stream_pair
    from chatbot.loading import adapter_name, load_model, load_onnx
    from chatbot.service import ChatService

    cfg = ModelConfig(adapter=str(DEFAULT_ADAPTER), backend="onnx")
    model, tok = load_model(cfg)
    engine = ChatEngine(model, tok, onnx=load_onnx(cfg))
    name = adapter_name(str(DEFAULT_ADAPTER))
    assert engine.onnx_pair((BASE, name)) is None  # Compare would run on torch until the warm-up
    ChatService(engine, guard, GenerationConfig()).warm_up()
    assert engine.onnx_pair((BASE, name)) == name
    messages = ask("The first Compare after a start.")
    ids, _ = engine.prepare(messages)
    prefix = engine.shared_prefix(messages, ids)
    assert 0 < prefix and engine.onnx.pairs[name].kept == ids[:prefix]

    def broken(*args, **kwargs):
        raise RuntimeError("the pair's session failed")

    monkeypatch.setattr(engine.onnx.pairs[name], "generate", broken)
    with pytest.raises(RuntimeError), caplog.at_level("WARNING"):  # this Compare shows the error notice
        list(stream_pair(engine, messages, GREEDY, None, (BASE, name)))
    assert "runs on the torch engine" in caplog.text and engine.onnx_pair((BASE, name)) is None
    texts = ["", ""]
    for row, delta in stream_pair(engine, messages, GREEDY, None, (BASE, name)):  # the next one, on torch
        texts[row] += delta
    assert texts[0].strip() and texts[1].strip()


def test_adapters_the_pair_cannot_map_are_refused(tiny_dir, tmp_path):
    """DoRA, saved modules and an adapted output head have no place in the base export's graph."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatbot.onnx_engine import OnnxUnavailable
    from chatbot.onnx_pair import lora_matrices

    for name, config in {"dora": LoraConfig(target_modules=["q_proj"], use_dora=True),
                         "head": LoraConfig(target_modules=["q_proj", "lm_head"]),
                         "saved": LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])}.items():
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir), config).save_pretrained(tmp_path / name)
        with pytest.raises(OnnxUnavailable):
            lora_matrices(tiny_dir, tmp_path / name)


def test_nucleus_draw_keeps_what_transformers_top_p_keeps():
    """The pair samples top-p among the most likely tokens instead of sorting the vocabulary: the
    same tokens with the same probabilities as TopPLogitsWarper and softmax, and the full way
    where a nucleus is wider than the candidates."""
    import torch
    from transformers.generation.logits_process import TopPLogitsWarper

    from chatbot.onnx_pair import nucleus, nucleus_draw

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 49152, generator=gen) * 2
    scores[:, :40] += torch.linspace(20, 8, 40)  # peaked, as a language model's next token mostly is
    for top_p in (0.5, 0.9, 0.99):
        expected = torch.softmax(TopPLogitsWarper(top_p)(None, scores), dim=-1)
        index, weights = nucleus(scores, top_p)
        got = torch.zeros_like(scores).scatter(-1, index, weights)
        got = got / got.sum(-1, keepdim=True)
        assert torch.equal(got > 0, expected > 0) and torch.allclose(got, expected, atol=1e-6)
    flat = torch.randn(2, 49152, generator=gen)  # a nucleus of thousands of tokens
    assert nucleus(flat, 0.9) is None
    torch.manual_seed(0)
    drawn = {int(t) for _ in range(50) for t in nucleus_draw(0.9)(flat)}
    assert len(drawn) > 50  # drawn from the whole nucleus, not the candidates alone
    torch.manual_seed(0)
    tokens = torch.stack([nucleus_draw(0.5)(scores) for _ in range(200)])
    allowed = TopPLogitsWarper(0.5)(None, scores) > float("-inf")
    assert all(bool(allowed[row, tokens[:, row]].all()) for row in (0, 1))


def test_the_pairs_lean_sampling_gives_what_transformers_processors_give():
    """The pair's steps write the repetition penalty and the minimum length into their own logits
    and draw temperature, top-k and top-p from one top-k: the same scores to the bit, and the
    same tokens with the same probabilities as transformers' processors and softmax. A tie at the
    k-th score, where top-k keeps more than k, is drawn the full way."""
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    from chatbot.onnx_pair import lean_sampling, top_k_nucleus

    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 49152, generator=gen) * 2
    scores[:, :40] += torch.linspace(20, 8, 40)
    ids = torch.randint(0, 60, (2, 30), generator=gen)  # repeats, and some of the likeliest tokens
    eos = [2, 7]
    for length in (20, 26):  # before and after the minimum length
        processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.1), MinNewTokensLengthLogitsProcessor(length, 8, eos),
                                          TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.9)])
        expected = LogitsProcessorList(processors[:2])(ids, scores.clone())
        lean, sample, draw = lean_sampling(processors, True)
        assert sample and len(lean) == 2 and draw is not None
        assert torch.equal(lean(ids, scores.clone()), expected)
        assert bool(torch.isinf(expected[:, eos]).all()) == (length == 26)
        processed = processors(ids, scores.clone())
        probs = torch.softmax(processed, dim=-1)
        index, weights = top_k_nucleus(expected, 50, 0.9, 0.7)
        got = torch.zeros_like(scores).scatter(-1, index, weights)
        got = got / got.sum(-1, keepdim=True)
        assert torch.equal(got > 0, probs > 0) and torch.allclose(got, probs, atol=1e-6)
        torch.manual_seed(0)
        tokens = torch.stack([draw(expected.clone()) for _ in range(200)])
        assert all(bool((probs[row, tokens[:, row]] > 0).all()) for row in (0, 1))
        assert len(set(tokens[:, 0].tolist())) > 1  # sampled, not greedy

    for top_p in (1.0, 0.5):  # top-k alone, and a narrow nucleus
        warpers = [TemperatureLogitsWarper(1.3), TopKLogitsWarper(20)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
        probs = torch.softmax(LogitsProcessorList(warpers)(None, scores.clone()), dim=-1)
        index, weights = top_k_nucleus(scores, 20, top_p, 1.3)
        got = torch.zeros_like(scores).scatter(-1, index, weights)
        assert torch.equal(got > 0, probs > 0) and torch.allclose(got / got.sum(-1, keepdim=True), probs, atol=1e-6)

    tied = torch.randn(2, 49152, generator=gen)
    tied[0, 100] = tied[0, 101] = tied[0].topk(50).values[-1]  # ties with the 50th score
    assert top_k_nucleus(tied, 50) is None
    _, _, draw = lean_sampling(LogitsProcessorList([TopKLogitsWarper(50)]), True)
    allowed = TopKLogitsWarper(50)(None, tied) > float("-inf")
    assert int(allowed[0].sum()) > 50 and int(allowed[1].sum()) == 50
    torch.manual_seed(0)
    tokens = torch.stack([draw(tied.clone()) for _ in range(300)])
    assert all(bool(allowed[row, tokens[:, row]].all()) for row in (0, 1))
    assert lean_sampling(LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2)]), False)[1:] == (False, None)
    small, past_head = torch.randn(2, 100, generator=gen), torch.tensor([[5, 150, 7], [99, 3, 120]])  # ids past the head
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), MinNewTokensLengthLogitsProcessor(3, 5, [4, 200])])
    assert torch.equal(lean_sampling(processors, False)[0](past_head, small.clone()), processors(past_head, small.clone()))
