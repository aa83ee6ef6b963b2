"""A lean decoding loop for Llama-style models on CPU: `generate` without its per-token overhead.

    from chatbot.decoder import generate, supports
    if supports(model, kwargs):
        generate(model, streamer=streamer, **kwargs)   # same kwargs and streamer calls as model.generate

A 135M model on a 2-core CPU spends much of each token outside its matrix products: through
transformers' `generate`, a token of the default int8 model took about 36 ms on the project's CPU,
of which the int8 kernels were 15 ms; the rest is cache bookkeeping, masks, hooks and dozens of
small operators per layer. Here a pre-allocated KV cache per layer, rotary tables computed once
per reply, `torch.rms_norm`, logits for the last position only, and one int8 kernel call per group
of projections that read the same input (q/k/v, gate/up) bring a token to about 24 ms. The
layers' own modules and weights (int8 variants, PEFT layers, compare's pairs) and transformers'
logits processors are used as they are, and every operation is the one the model's forward does,
so the replies are `model.generate`'s to the bit: the tests check tokens, streamer calls and
logits against it. Two exceptions, both within rounding: compare's adapter row adds each group's
LoRA products in one sum (a few bfloat16 steps on the logits, tested), and a prompt run after a
kept prefix (below).

`shared_prefix=n` (the app passes its system prompt's tokens, `ChatEngine.shared_prefix`): the
prompt's first n tokens run on their own and their keys and values are kept in memory
(`PREFIXES`, a few entries per model, keyed by the tokens and every weight they depend on), so
the next reply on the same weights starts its prefill after them (`make bench`: the first token
of a reply with the default model's 124-token system prompt in 0.18 s instead of 0.39 s). Both parts
take the path the whole prompt would (`int8.prompt_path`), and every reply with a prefix runs it
in the same two parts, kept or not, so a reply never depends on what ran before it; against
`generate` over the whole prompt the tokens can part (rarely) where two candidates are within
rounding.

What it covers is what the app asks for: rows of one prompt without padding, greedy or
temperature / top-k / top-p sampling, repetition penalty, min_new_tokens, stopping criteria, a
streamer. Anything else (padding, PEFT's per-row adapter_names, beam search, other processors,
sliding-window attention, CUDA) goes to `model.generate`. CHATBOT_DECODER=transformers turns it off.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F

MODEL_TYPES = ("llama", "qwen2", "qwen3")
# the int8 kernel; torch's direct binding costs less per call than torch.ops.aten
_INT8_MM = getattr(torch, "_weight_int8pack_mm", None) or torch.ops.aten._weight_int8pack_mm
KWARGS = {"input_ids", "attention_mask", "max_new_tokens", "min_new_tokens", "do_sample", "temperature",
          "top_p", "top_k", "repetition_penalty", "stopping_criteria", "pad_token_id"}
# transformers' global defaults where neither the call nor the model's generation_config sets a value
DEFAULTS = {"top_k": 50, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0, "do_sample": False}
# generation_config fields that would add a logits processor or a search this loop does not run
UNSUPPORTED = ("no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "min_p",
               "sequence_bias", "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
               "guidance_scale", "watermarking_config", "top_h", "epsilon_cutoff", "eta_cutoff", "min_length",
               "renormalize_logits", "remove_invalid_values", "output_scores", "return_dict_in_generate")


def causal_lm(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports(model, kwargs: dict) -> bool:
    """Whether `generate(model, **kwargs)` runs here rather than through `model.generate`."""
    if os.environ.get("CHATBOT_DECODER", "auto") == "transformers" or set(kwargs) - KWARGS:
        return False
    lm = causal_lm(model)
    config, gen = lm.config, lm.generation_config
    if config.model_type not in MODEL_TYPES or lm.device.type != "cpu" or lm.training:
        return False
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return False
    if any(getattr(gen, name, None) not in (None, 0, 1.0, False, []) for name in UNSUPPORTED):
        return False
    if (gen.num_beams or 1) > 1 or (gen.num_return_sequences or 1) > 1 or (gen.typical_p or 1.0) < 1.0:
        return False
    mask = kwargs.get("attention_mask")
    return mask is None or bool(mask.all())


def _processors(lm, prompt_len: int, kwargs: dict, eos: list[int]):
    """transformers' own logits processors, in generate's order, for the settings the app uses."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    gen = lm.generation_config

    def setting(name):  # generate's precedence: its arguments, the model's config, global defaults
        if name in kwargs:
            return kwargs[name]
        value = getattr(gen, name, None)
        return DEFAULTS.get(name) if value is None else value

    out = LogitsProcessorList()
    if (penalty := setting("repetition_penalty")) not in (None, 1.0):
        out.append(RepetitionPenaltyLogitsProcessor(penalty))
    if (min_new := setting("min_new_tokens")) and eos:
        out.append(MinNewTokensLengthLogitsProcessor(prompt_len, min_new, eos))
    sample = bool(setting("do_sample"))
    if sample:
        if (temperature := setting("temperature")) not in (None, 1.0):
            out.append(TemperatureLogitsWarper(temperature))
        if top_k := setting("top_k"):
            out.append(TopKLogitsWarper(top_k))
        if (top_p := setting("top_p")) is not None and top_p < 1.0:
            out.append(TopPLogitsWarper(top_p))
    return out, sample


class _Cache:
    """Pre-allocated keys and values for every layer: [rows, kv heads, length, head dim]."""

    def __init__(self, lm, rows: int, length: int):
        cfg = lm.config
        heads = cfg.num_key_value_heads or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (rows, heads, length, head_dim)
        dtype = lm.model.embed_tokens.weight.dtype
        self.keys = [torch.empty(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.empty(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]


def _tensor_identity(t: torch.Tensor | None, held: list) -> tuple | None:
    """Address, in-place version and shape; `held` keeps the tensor alive with the entry, so no
    other tensor can take its address while the entry exists."""
    if t is None:
        return None
    held.append(t)
    return t.data_ptr(), t._version, tuple(t.shape)


def _module_identity(module, held: list) -> tuple:
    """The tensors a projection computes with now: its selected int8 variant or pair, or a PEFT
    layer's active adapters (weights and scaling) on its base."""
    held.append(module)
    ids = [type(module).__name__, id(module), _tensor_identity(module.weight, held),
           _tensor_identity(getattr(module, "bias", None), held)]
    if hasattr(module, "scales"):  # Int8Linear
        ids += [_tensor_identity(module.scales, held), module.pair]
        ids += [None if lora is None else (_tensor_identity(lora[0], held), _tensor_identity(lora[1], held), lora[2])
                for lora in module.pair_loras]
    if hasattr(module, "lora_A"):  # a PEFT LoRA layer that adds its adapters
        ids += [_module_identity(module.get_base_layer(), held), module.merged, module.disable_adapters]
        for name in module.active_adapters:
            if name in module.lora_A:
                dora = module.use_dora.get(name, False)
                ids += [name, module.scaling[name], _tensor_identity(module.lora_A[name].weight, held),
                        _tensor_identity(module.lora_B[name].weight, held), dora]
                if dora:
                    ids.append(_tensor_identity(module.lora_magnitude_vector[name].weight, held))
    return tuple(ids)


class _Prefixes:
    """Keys and values of prompt prefixes that many replies share (the app's system prompt), per
    model, kept in memory for the last few weight selections (base, each adapter, compare's pair).

    An entry is found only by the exact prefix tokens and an identity of every weight the keys
    and values depend on: each tensor's address and in-place version, which variant or pair an
    int8 layer runs, which adapters a PEFT layer applies. Anything that changes the model's
    numbers therefore misses and recomputes. A prefix is always computed on its own, then the rest
    of the prompt after it, whether the entry was there or not, so a reply does not depend on what
    ran before it.
    """

    SIZE = 4  # entries per model: base, fine-tuned, compare's pair and one more

    def __init__(self):
        self.models: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @staticmethod
    def identity(lm, layers: list[_Layer]) -> tuple[tuple, list] | None:
        """What the prefix's keys and values depend on, and the objects it names (kept with the
        entry), or None where it cannot be told: the embedding, and per layer its norms and the
        modules that run (see `_module_identity`)."""
        held: list = []
        try:
            parts = [_tensor_identity(lm.model.embed_tokens.weight, held)]
            for layer in layers:
                norms = [layer.norm1, layer.norm2, *(layer.qk_norm or ())]
                parts += [_tensor_identity(n.weight, held) for n in norms]
                for group in (layer.qkv, layer.o, layer.gate_up, layer.down):
                    parts += [_module_identity(m, held) for m in group.modules]
        except RuntimeError:  # inference tensors keep no version counter
            return None
        return tuple(parts), held

    def restore(self, lm, key: tuple, cache: _Cache, length: int) -> bool:
        entries = self.models.get(lm)
        found = entries.get(key) if entries is not None else None
        if found is None:
            return False
        entries.move_to_end(key)
        for dst, src in zip(cache.keys + cache.values, found[0]):
            dst[:, :, :length] = src
        return True

    def store(self, lm, key: tuple, held: list, cache: _Cache, length: int) -> None:
        entries = self.models.setdefault(lm, OrderedDict())
        entries[key] = ([t[:, :, :length].clone() for t in cache.keys + cache.values], held)
        while len(entries) > self.SIZE:
            entries.popitem(last=False)

    def clear(self) -> None:
        self.models.clear()


PREFIXES = _Prefixes()


def _unwrapped(module):
    """A PEFT LoRA layer that adds nothing now (adapters off, merged, or none of its adapters
    active) does only its base layer's work: call that directly."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return module
    if not isinstance(module, LoraLayer):
        return module
    if module.disable_adapters:
        return module if module.merged else module.get_base_layer()
    if module.merged or not set(module.active_adapters) & set(module.lora_A):
        return module.get_base_layer()
    return module


class _Group:
    """Projections that read the same input (q, k, v; gate, up; or one alone). When each is a plain
    Int8Linear, one bfloat16 copy of the input feeds the int8 kernel directly, in one call for the
    whole group where their weights are stacked (`int8.pack_groups`). In the compare view's pair
    mode both rows share that call on the base weights, and each row adds its adapter's LoRA
    products for the whole group in one low-rank product (`_row_lora`)."""

    def __init__(self, modules):
        from . import int8

        self.modules = [_unwrapped(m) for m in modules]
        self.sizes = [m.out_features for m in self.modules]
        plain = all(type(m) is int8.Int8Linear and m.bias is None for m in self.modules)
        pairs = {m.pair for m in self.modules} if plain else set()
        self.pair = plain and len(pairs) == 1 and None not in pairs
        self.direct = plain and pairs == {None}
        self.weights = None  # (stacked weights, scales) for one call
        if self.direct and len(self.modules) > 1:
            self.weights = int8.stacked(self.modules)
        elif self.pair:
            self.weights = int8.stacked(self.modules, int8.BASE_VARIANT)
            self.rows = [self._row_lora(row) for row in range(2)]
            self.pair = self.weights is not None

    def _row_lora(self, row: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This row's adapter over the whole group as one low-rank product: its projections' A
        stacked (input x ranks) and their B, scaled, block-diagonal (ranks x output columns)."""
        parts, start = [], 0
        for m, size in zip(self.modules, self.sizes):
            lora = m.pair_loras[row] if m.pair_loras else None
            if lora is not None:
                parts.append((start, size, *lora))
            start += size
        if not parts:
            return None
        a_t = torch.cat([a for _, _, a, _, _ in parts]).t().contiguous()
        b_t = torch.zeros(a_t.shape[1], start, dtype=a_t.dtype)
        rank = 0
        for begin, size, a, b, scaling in parts:
            b_t[rank : rank + a.shape[0], begin : begin + size] = b.t() * scaling
            rank += a.shape[0]
        return a_t, b_t

    def __call__(self, h: torch.Tensor) -> list[torch.Tensor]:
        from .int8 import PREFILL_ROWS, on_prompt_path

        rows = h.shape[0] * h.shape[1]
        # a prompt takes each module's own float path (stacking it measured slower)
        if rows >= PREFILL_ROWS or on_prompt_path() or not (self.direct or (self.pair and h.shape[0] == 2)):
            return [m(h) for m in self.modules]
        flat = h.reshape(rows, -1)
        hb = flat.to(torch.bfloat16)
        if self.weights is None:
            return [_INT8_MM(hb, m.weight, m.scales).to(h.dtype).view(*h.shape[:-1], -1) for m in self.modules]
        y = _INT8_MM(hb, *self.weights).to(h.dtype).view(*h.shape[:-1], -1)
        if self.pair:
            for row, lora in enumerate(self.rows):
                if lora is not None:  # Int8Linear.forward's sum, in two products for the group
                    y[row].addmm_(h[row] @ lora[0], lora[1])
        return y.split(self.sizes, dim=-1)


class _Layer:
    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        self.attn, self.act = attn, mlp.act_fn
        self.qkv = _Group([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = _Group([attn.o_proj])
        self.gate_up = _Group([mlp.gate_proj, mlp.up_proj])
        self.down = _Group([mlp.down_proj])
        self.norm1, self.norm2 = layer.input_layernorm, layer.post_attention_layernorm
        self.qk_norm = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else None  # Qwen3


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    return torch.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers applies it, x * cos + rotate_half(x) * sin, with
    rotate_half's sign folded into `sin` (see `_rotary_tables`): the same numbers, fewer operators."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def _rotary_tables(lm, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin for positions 0..length-1, from the model's own rotary embedding."""
    cos, sin = lm.model.rotary_emb(lm.model.embed_tokens.weight[:1], torch.arange(length).unsqueeze(0))
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def _forward(lm, layers: list[_Layer], ids: torch.Tensor, start: int, cache: _Cache, cos: torch.Tensor,
             sin: torch.Tensor, prompt_rows: int = 0) -> torch.Tensor:
    """Logits of the last position for `ids` at positions start.., extending `cache` in place.
    `prompt_rows`: the rows of the whole prompt when `ids` is a part of it (`_prompt_path`)."""
    rows, length = ids.shape
    end = start + length
    cos, sin = cos[:, None, start:end], sin[:, None, start:end]
    # several new positions see the cache and each other up to themselves (SDPA's is_causal
    # aligns to the top left, which is right only from position 0)
    causal, mask = length > 1 and start == 0, None
    if length > 1 and start > 0:
        mask = torch.ones(length, end, dtype=torch.bool).tril_(start)
    x = lm.model.embed_tokens(ids)
    with _prompt_path(prompt_rows):  # the layers only: the head sees one row either way
        for i, layer in enumerate(layers):
            attn = layer.attn
            shape = (rows, length, -1, attn.head_dim)
            q, k, v = layer.qkv(_rms_norm(x, layer.norm1))
            q, k, v = q.view(shape), k.view(shape), v.view(shape)
            heads = q.shape[2]
            if layer.qk_norm:  # Qwen3
                q, k = layer.qk_norm[0](q), layer.qk_norm[1](k)
                q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)
            elif k.data_ptr() == q.data_ptr() + q[0, 0].numel() * q.element_size() and k.stride() == q.stride():
                # q and k sit side by side in one stacked product: rotate both in one pass
                qk = q.as_strided((rows, length, heads + k.shape[2], attn.head_dim), q.stride())
                qk = _rotate(qk.transpose(1, 2), cos, sin)
                q, k = qk[:, :heads], qk[:, heads:]
            else:
                q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)
            keys, values = cache.keys[i], cache.values[i]
            keys[:, :, start:end] = k
            values[:, :, start:end] = v.transpose(1, 2)
            o = F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                               is_causal=causal, scale=attn.scaling, enable_gqa=True)
            x = x + layer.o(o.transpose(1, 2).reshape(rows, length, -1))[0]
            gate, up = layer.gate_up(_rms_norm(x, layer.norm2))
            x = x + layer.down(layer.act(gate) * up)[0]
    x = _rms_norm(x[:, -1:], lm.model.norm)
    return lm.lm_head(x)[:, -1].float()


def _prompt_path(prompt_rows: int):
    """A part of a prompt takes the path (float or int8 kernel) the whole prompt would."""
    from . import int8

    return int8.prompt_path() if prompt_rows >= int8.PREFILL_ROWS else contextlib.nullcontext()


def _prefill_prefix(lm, layers, prefix: torch.Tensor, prompt_rows: int, cache: _Cache, cos, sin) -> None:
    """Fill `cache` with `prefix`'s keys and values, from PREFIXES or computed (and then kept)."""
    identity = PREFIXES.identity(lm, layers)
    key = None if identity is None else (identity[0], tuple(prefix.shape), tuple(prefix.flatten().tolist()))
    length = prefix.shape[1]
    if key is not None and PREFIXES.restore(lm, key, cache, length):
        return
    _forward(lm, layers, prefix, 0, cache, cos, sin, prompt_rows)
    if key is not None:
        PREFIXES.store(lm, key, identity[1], cache, length)


def eos_and_pad(lm, pad_token_id: int | None) -> tuple[list[int], int | None]:
    """The model's end-of-sequence ids as a list, and the pad id `generate` would use."""
    eos = lm.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return eos, pad_token_id if pad_token_id is not None else lm.generation_config.pad_token_id


def next_tokens(processors, sample: bool, ids: torch.Tensor, logits: torch.Tensor, unfinished: torch.Tensor,
                pad: int | None, eos_ids: torch.Tensor, stopping_criteria=None, draw=None):
    """One step's tokens as `generate` picks them: (tokens, ids with them, rows still going).
    A row that has ended gets `pad`; the stopping criteria run before the tokens are streamed.
    `draw`: another way to sample from the processed scores (the ONNX pair's `nucleus_draw`)."""
    scores = processors(ids, logits)
    if sample and draw is not None:
        token = draw(scores)
    elif sample:
        token = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    else:
        token = scores.argmax(-1)
    if pad is not None:
        token = torch.where(unfinished, token, pad)
    ids = torch.cat([ids, token[:, None]], dim=-1)
    if len(eos_ids):
        unfinished = unfinished & (token[:, None] != eos_ids).all(-1)
    for criterion in stopping_criteria or []:
        unfinished = unfinished & ~criterion(ids, None)
    return token, ids, unfinished


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, streamer=None, stopping_criteria=None,
             pad_token_id: int | None = None, shared_prefix: int = 0, **settings) -> torch.Tensor:
    """`model.generate` for what `supports` accepts: returns prompt and new tokens, calls the streamer
    and the stopping criteria as generate does (a row that ends pads until every row has ended).

    `shared_prefix`: the number of leading prompt tokens that other replies share (the system
    prompt). Their keys and values are kept (`PREFIXES`) and reused by the next reply that starts
    with the same tokens on the same weights.
    """
    lm = causal_lm(model)
    settings.pop("attention_mask", None)
    eos, pad = eos_and_pad(lm, pad_token_id)
    rows, prompt_len = input_ids.shape
    processors, sample = _processors(lm, prompt_len, settings, eos)
    total = prompt_len + max_new_tokens
    cos, sin = _rotary_tables(lm, total)
    cache = _Cache(lm, rows, total)
    layers = [_Layer(layer) for layer in lm.model.layers]  # the adapter selection holds for the reply
    eos_ids = torch.tensor(eos, dtype=input_ids.dtype)
    unfinished = torch.ones(rows, dtype=torch.bool)
    ids = input_ids
    if streamer is not None:
        streamer.put(input_ids.cpu())
    step_ids, start, part = input_ids, 0, 0  # part: the prompt's rows while the rest of a prompt runs
    if 0 < shared_prefix < prompt_len:
        part = rows * prompt_len
        _prefill_prefix(lm, layers, input_ids[:, :shared_prefix], part, cache, cos, sin)
        step_ids, start = input_ids[:, shared_prefix:], shared_prefix
    for _ in range(max_new_tokens):
        logits = _forward(lm, layers, step_ids, start, cache, cos, sin, part)
        part = 0
        start += step_ids.shape[1]
        token, ids, unfinished = next_tokens(processors, sample, ids, logits, unfinished, pad, eos_ids,
                                             stopping_criteria)
        if streamer is not None:
            streamer.put(token.cpu())
        if not unfinished.any():
            break
        step_ids = token[:, None]
    if streamer is not None:
        streamer.end()
    return ids
