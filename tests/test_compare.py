"""Compare view and adapters on a tiny model whose adapter changes the output deterministically:
the /compare endpoint, adapter switching and refusal, and two users on two models at once."""

from __future__ import annotations

import threading

import pytest

from chatbot.config import GenerationConfig, ModelConfig
from chatbot.generation import ChatEngine
from chatbot.loading import AdapterError, load_model
from chatbot.service import ChatService
from tests.conftest import make_tiny_model

GREEDY = GenerationConfig(max_new_tokens=16, temperature=0)
MESSAGE = "I keep worrying about everything lately."


def _adapter(path, vocab, hidden=32, seed=1):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(make_tiny_model(vocab, hidden=hidden, tie=False),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with untied embeddings (it writes words rather than repeating its input)."""
    path = tmp_path_factory.mktemp("tiny-untied")
    make_tiny_model(len(tokenizer), tie=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("adapters")
    _adapter(folder / "calm", len(tokenizer), seed=1)
    _adapter(folder / "kind", len(tokenizer), seed=2)
    _adapter(folder / "wide", len(tokenizer), hidden=64, seed=3)  # made for another base
    return folder


@pytest.fixture
def service(untied_dir, adapters_dir, guard):
    model, tok = load_model(ModelConfig(model=str(untied_dir), adapter=str(adapters_dir / "calm")))
    return ChatService(ChatEngine(model, tok), guard, GREEDY)


def reference(untied_dir, adapter, message=MESSAGE, quantize="auto"):
    """What a model loaded on its own answers, through the same service."""
    from safety import Guard

    model, tok = load_model(ModelConfig(model=str(untied_dir), adapter=str(adapter) if adapter else None,
                                        quantize=quantize))
    return ChatService(ChatEngine(model, tok), Guard(), GREEDY).reply(message)


def test_compare_gives_base_and_adapter_answers(service, untied_dir, adapters_dir):
    from chatbot.compare import compare

    states = list(compare(service, MESSAGE))
    final = states[-1]
    assert final["status"] == ["passed", "passed"] and not final["crisis"]
    base, tuned = reference(untied_dir, None), reference(untied_dir, adapters_dir / "calm")
    assert base != tuned  # the adapter really changes the reply
    assert [final["base"], final["finetuned"]] == [base, tuned]
    assert len(states) > 3  # streamed, not delivered in one piece


def test_compare_paths_int8_pair_and_float32_peft_rows(untied_dir, adapters_dir, guard):
    """CPU default (int8): both rows in one pass on the shared int8 base, each adding its own LoRA
    product. float32: PEFT's per-row adapter_names. On this tiny model either way each answer is
    what that model alone says (on the real model int8 rounding can part greedy replies late;
    test_loading checks the pair's logits against PEFT's own layers)."""
    from chatbot.compare import compare

    for quantize in ("auto", "none"):
        model, tok = load_model(ModelConfig(model=str(untied_dir), adapter=str(adapters_dir / "calm"), quantize=quantize))
        engine = ChatEngine(model, tok)
        assert (engine.pair_context(("base", "calm")) is not None) == (quantize == "auto")
        final = list(compare(ChatService(engine, guard, GREEDY), MESSAGE))[-1]
        expected = [reference(untied_dir, None, quantize=quantize), reference(untied_dir, adapters_dir / "calm", quantize=quantize)]
        assert [final["base"], final["finetuned"]] == expected
        if quantize == "auto":  # back to single-model state afterwards
            q = model.get_base_model().model.layers[0].self_attn.q_proj
            assert q.base_layer.pair is None and not q.disable_adapters


def test_warm_up_reads_the_system_prompt_for_chat_and_the_pair(service, caplog):
    """At start the app prefills the system prompt for the fine-tuned model and for Compare's
    pair; the first real requests then find it kept instead of computing it."""
    from chatbot import decoder
    from chatbot.compare import compare

    decoder.PREFIXES.clear()
    service.warm_up()
    kept = lambda: sum(len(entries) for entries in decoder.PREFIXES.models.values())  # noqa: E731
    assert kept() == 2  # the fine-tuned model alone, and the pair
    service.reply(MESSAGE)
    list(compare(service, MESSAGE))
    assert kept() == 2  # both found what the warm-up left, nothing new computed
    decoder.PREFIXES.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    service.engine.stream = broken
    service.warm_up()  # a failure is logged, never raised
    assert "warm-up failed (RuntimeError)" in caplog.text and kept() == 0


def test_compare_screens_input_once_and_routes_crisis(service, guard):
    from chatbot.compare import compare

    states = list(compare(service, "I want to end my life tonight"))
    assert len(states) == 1 and states[0]["crisis"]
    assert states[0]["base"] == states[0]["finetuned"] == guard.crisis_response(None)
    french = list(compare(service, "je veux mourir"))  # answered in the language it was caught in
    assert french[0]["base"] == french[0]["finetuned"] == guard.crisis_response(None, language="fr")


def test_compare_endpoint_through_gradio_client(service, untied_dir, adapters_dir):
    import app
    from gradio_client import Client

    demo = app.build_demo(service, [("International", "INTL")], adapters=app.AdapterChoices(service, adapters_dir))
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        base, tuned = client.predict(MESSAGE, api_name="/compare")
        assert [base, tuned] == [reference(untied_dir, None), reference(untied_dir, adapters_dir / "calm")]
        assert client.predict(MESSAGE, api_name="/chat") == tuned  # chat uses the fine-tuned model
    finally:
        demo.close()


def test_switching_adapters_without_restart(service, untied_dir, adapters_dir):
    import app

    choices = app.AdapterChoices(service, adapters_dir)
    assert [v for _, v in choices.choices()] == ["base", "calm", "kind", "wide"]
    assert choices.select("kind") == "kind"
    assert service.reply(MESSAGE, adapter="kind") == reference(untied_dir, adapters_dir / "kind")
    assert service.reply(MESSAGE, adapter="calm") == reference(untied_dir, adapters_dir / "calm")
    assert service.reply(MESSAGE, adapter="base") == reference(untied_dir, None)


def test_adapter_for_another_base_is_refused_and_the_app_keeps_working(service, adapters_dir):
    import app

    choices = app.AdapterChoices(service, adapters_dir)
    before = service.reply(MESSAGE)
    with pytest.raises(AdapterError, match="wide.*does not fit"):
        choices.select("wide")
    assert "wide" not in service.engine.adapters
    assert service.reply(MESSAGE) == before


def test_two_users_on_two_models_each_get_their_own(service, untied_dir, adapters_dir):
    """Interleaved requests on one shared model: a race in adapter switching would mix them up."""
    expected = {"base": reference(untied_dir, None), "calm": reference(untied_dir, adapters_dir / "calm")}
    assert expected["base"] != expected["calm"]
    got: dict[str, list[str]] = {"base": [], "calm": []}
    start = threading.Barrier(2)

    def user(adapter):
        start.wait()
        for _ in range(4):
            got[adapter].append(service.reply(MESSAGE, adapter=adapter))

    threads = [threading.Thread(target=user, args=(a,)) for a in ("base", "calm")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got["base"] == [expected["base"]] * 4
    assert got["calm"] == [expected["calm"]] * 4


def test_merged_model_has_no_base_to_compare(untied_dir, adapters_dir, guard):
    from chatbot.compare import compare

    model, tok = load_model(ModelConfig(model=str(untied_dir), adapter=str(adapters_dir / "calm"), merge=True))
    service = ChatService(ChatEngine(model, tok, merged=True), guard, GREEDY)
    with pytest.raises(ValueError, match="--adapter|merge"):
        list(compare(service, MESSAGE))
    with pytest.raises(AdapterError, match="--merge"):
        service.engine.add_adapter(str(adapters_dir / "kind"))


def test_compare_stop_frees_the_model_and_hostile_input_is_calm(service):
    from chatbot.compare import compare

    stop = threading.Event()
    stream = compare(service, MESSAGE, stop=stop, gen=GenerationConfig(max_new_tokens=200, temperature=0))
    next(stream)
    stream.close()  # a client that leaves mid-comparison
    assert stop.is_set() and not service.engine.lock.locked()
    for text in ("", "x" * 100_000, "lone \ud800 surrogate \u202e", "<img src=x onerror=alert(1)>"):
        final = list(compare(service, text))[-1]
        assert final["base"].strip() and final["finetuned"].strip()
