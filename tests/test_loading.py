"""Model loading: the built-in default, local folders, quantization, adapters and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from chatbot.config import ModelConfig
from chatbot.loading import AdapterError, ModelLoadError, attach_adapter, convert_default_model, load_model, quantization_config
from tests.conftest import make_tiny_model, save_adapter as _save_adapter


def test_default_model_converted_once(default_model_dir):
    assert (default_model_dir / "config.json").is_file()
    assert (default_model_dir / "model.safetensors").is_file()
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # plain safetensors, not a GGUF marker
    stamp = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    assert convert_default_model() == default_model_dir
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again


def test_local_folder_loads(tiny_dir):
    model, tok = load_model(ModelConfig(model=str(tiny_dir), adapter=None))
    assert model.config.hidden_size == 32 and tok.pad_token is not None
    assert not model.training


def test_missing_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_text("not a model")
    with pytest.raises(ModelLoadError, match="model folder or Hub id"):
        load_model(ModelConfig(model=str(bad)))


def test_quantization_translator():
    assert quantization_config("none", "cpu") is None
    assert quantization_config("auto", "cpu") is None  # CPU: int8 weight-only, applied by load_model
    cfg = quantization_config("auto", "cuda")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4"
    assert quantization_config("8bit", "cpu").load_in_8bit
    with pytest.raises(ValueError):
        ModelConfig(quantize="3bit")


def test_4bit_on_cpu_generates(tiny_dir_4bit):
    model, tok = load_model(ModelConfig(model=str(tiny_dir_4bit), quantize="4bit", adapter=None))
    assert getattr(model, "is_loaded_in_4bit", False)
    out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 7


def test_adapter_attaches_and_changes_output(tiny_dir, tokenizer, tmp_path):
    adapter = _save_adapter(tmp_path / "lora", vocab=len(tokenizer))
    model, _ = load_model(ModelConfig(model=str(tiny_dir), adapter=str(adapter)))
    assert list(model.peft_config) == ["lora"]  # loaded under its folder's name
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert not torch.allclose(tuned, base)


def test_adapter_for_another_base_is_refused(tiny_dir, tokenizer, tmp_path):
    adapter = _save_adapter(tmp_path / "wide-lora", hidden=64, vocab=len(tokenizer))
    model, _ = load_model(ModelConfig(model=str(tiny_dir), adapter=None))
    with pytest.raises(AdapterError, match="does not fit"):
        attach_adapter(model, str(adapter))


def test_missing_adapter_is_named(tiny_dir, tmp_path):
    with pytest.raises(AdapterError, match="no-such-adapter"):
        load_model(ModelConfig(model=str(tiny_dir), adapter=str(tmp_path / "no-such-adapter")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_model(ModelConfig(model=str(tiny_dir), adapter=str(tmp_path / "empty")))


def test_merged_adapter_matches_hot_swapped(tiny_dir, tokenizer, tmp_path):
    adapter = _save_adapter(tmp_path / "lora", vocab=len(tokenizer))
    swapped, _ = load_model(ModelConfig(model=str(tiny_dir), adapter=str(adapter), quantize="none"))
    merged, _ = load_model(ModelConfig(model=str(tiny_dir), adapter=str(adapter), merge=True, quantize="none"))
    ids = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        assert torch.allclose(swapped(ids).logits, merged(ids).logits, atol=1e-4)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0, -1]


@pytest.mark.parametrize("length", [4, 40])  # one path for decoding, one for prompts (PREFILL_ROWS)
def test_int8_is_the_cpu_default_and_close_to_float32(tiny_dir, length):
    from chatbot.int8 import Int8Linear

    full, _ = load_model(ModelConfig(model=str(tiny_dir), adapter=None, quantize="none"))
    int8, _ = load_model(ModelConfig(model=str(tiny_dir), adapter=None))  # auto on CPU
    assert isinstance(int8.lm_head, Int8Linear) and isinstance(int8.model.layers[0].mlp.up_proj, Int8Linear)
    assert int8.model.embed_tokens.weight.dtype == torch.float32  # lookups stay exact
    ids = torch.arange(1, length + 1)[None]
    a, b = _logits(full, ids), _logits(int8, ids)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_int8_keeps_adapters_switchable(tiny_dir, tokenizer, tmp_path):
    from chatbot.generation import BASE, ChatEngine
    from chatbot.int8 import Int8Linear

    first = _save_adapter(tmp_path / "first", vocab=len(tokenizer), seed=1)
    model, tok = load_model(ModelConfig(model=str(tiny_dir), adapter=str(first)))
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, Int8Linear) and q.lora_A["first"].weight.dtype == torch.float32
    engine = ChatEngine(model, tok)
    second = _save_adapter(tmp_path / "second", vocab=len(tokenizer), seed=2)
    assert engine.add_adapter(str(second)) == "second"
    ids = torch.tensor([[1, 20, 30, 40]])
    outs = {}
    for name in (BASE, "first", "second"):
        with engine.use_adapter(name):
            outs[name] = _logits(engine.model, ids)
    assert not torch.allclose(outs[BASE], outs["first"]) and not torch.allclose(outs["first"], outs["second"])


def test_int8_adapter_runs_as_a_merged_copy(tiny_dir, tokenizer, tmp_path):
    """A hot-swapped adapter on int8 layers decodes from a merged int8 copy: same logits as PEFT's
    layers to rounding, and the base weights are back when the request ends."""
    from chatbot.generation import BASE, ChatEngine
    from chatbot.int8 import BASE_VARIANT

    adapter = _save_adapter(tmp_path / "lora", vocab=len(tokenizer))
    model, tok = load_model(ModelConfig(model=str(tiny_dir), adapter=str(adapter)))
    full, _ = load_model(ModelConfig(model=str(tiny_dir), adapter=str(adapter), quantize="none"))
    engine = ChatEngine(model, tok)
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    base_weight = q.base_layer.weight
    ids = torch.tensor([[1, 20, 30, 40]])
    with engine.use_adapter("lora"):
        assert q.base_layer.weight is q.base_layer.variants["lora"][0] and q.disable_adapters
        fast = _logits(model, ids)
    assert q.base_layer.weight is base_weight and not q.disable_adapters
    with engine.use_adapter(BASE):
        base = _logits(model, ids)
    reference = _logits(full, ids)
    assert torch.nn.functional.cosine_similarity(fast, reference, dim=0) > 0.999
    assert not torch.allclose(fast, base)
    assert set(q.base_layer.variants) == {BASE_VARIANT, "lora"}


@pytest.mark.parametrize("length", [1, 40])  # a decoding step, and a prompt (PREFILL_ROWS)
def test_int8_pair_rows_are_base_and_adapter_on_the_int8_base(tiny_dir, tokenizer, tmp_path, length):
    """Compare's two-row batch: row 0 is exactly the base; row 1 is the base plus the adapter's LoRA
    product, as PEFT's own layers compute it on the same int8 base (the merged copy is not used)."""
    from chatbot.generation import BASE, ChatEngine
    from chatbot.int8 import _int8_lora_layers

    adapter = _save_adapter(tmp_path / "lora", vocab=len(tokenizer))
    model, tok = load_model(ModelConfig(model=str(tiny_dir), adapter=str(adapter)))
    engine = ChatEngine(model, tok)
    ids = torch.randint(3, len(tokenizer), (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), engine.pair_context((BASE, "lora")):
        pair = model(ids.repeat(2, 1)).logits[:, -1]
    with engine.use_adapter(BASE):
        base = _logits(model, ids)
    merged = {layer: layer.get_base_layer().variants.pop("lora") for layer in _int8_lora_layers(model)}
    with engine.use_adapter("lora"):  # no merged copy: PEFT's LoRA layers on the int8 base
        peft = _logits(model, ids)
    assert torch.equal(pair[0], base)
    assert torch.allclose(pair[1], peft, atol=1e-4) and not torch.allclose(peft, base, atol=1e-2)
    assert merged and all(layer.get_base_layer().pair is None for layer in merged)


def test_int8_falls_back_to_float32_without_the_kernel(tiny_dir, monkeypatch, caplog):
    from chatbot import int8

    from chatbot.loading import weights_format

    assert int8.int8_supported()  # this machine's torch has it
    assert weights_format(load_model(ModelConfig(model=str(tiny_dir), adapter=None))[0]) == "int8 weight-only (CPU)"
    monkeypatch.setattr(int8, "int8_supported", lambda: False)
    model, _ = load_model(ModelConfig(model=str(tiny_dir), adapter=None))
    assert type(model.lm_head) is torch.nn.Linear and "float32" in caplog.text
    assert weights_format(model) == "float32"
