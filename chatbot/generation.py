"""Streaming generation: a plain generator of text deltas that knows nothing about the UI.

    engine = ChatEngine(model, tokenizer)
    for delta in engine.stream(messages, GenerationConfig(), stop=threading.Event()):
        print(delta, end="")

One model serves every session: generation holds a lock, so concurrent requests queue and each
runs with the adapter it asked for. Setting the stop event (Stop button, client gone, closing the
generator) halts `generate` at the next token.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from .config import GenerationConfig
from .prompts import encode, fit_to_context

log = logging.getLogger(__name__)
BASE = "base"  # adapter name that means: the base model, adapter disabled
# One generation at a time in the process: sampling draws on torch's process-wide RNG (a seed
# must mean the same reply), and on a CPU two concurrent decodes only fight over the cores.
GENERATION_LOCK = threading.Lock()


class StopOnEvent:
    """A transformers StoppingCriteria that ends generation when an Event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ThinkFilter:
    """Drops <think>...</think> blocks from a stream of deltas (thinking-mode models like Qwen3)."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self):
        self.buffer = ""
        self.thinking = False

    def feed(self, delta: str) -> str:
        self.buffer += delta
        out = []
        while self.buffer:
            tag = self.CLOSE if self.thinking else self.OPEN
            idx = self.buffer.find(tag)
            if idx >= 0:
                if not self.thinking:
                    out.append(self.buffer[:idx])
                self.buffer = self.buffer[idx + len(tag) :]
                self.thinking = not self.thinking
                continue
            # hold back a possible partial tag at the end
            keep = next((k for k in range(len(tag) - 1, 0, -1) if self.buffer.endswith(tag[:k])), 0)
            if not self.thinking:
                out.append(self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep :]
            break
        return "".join(out)

    def flush(self) -> str:
        rest, self.buffer = ("" if self.thinking else self.buffer), ""
        return rest


def add_pair(onnx, name: str, adapter_dir) -> None:
    """Compare's ONNX pair model for an adapter; on failure Compare runs on the torch engine."""
    try:
        onnx.add_pair(name, adapter_dir)
    except Exception as exc:  # noqa: BLE001 - Compare still works, on torch; the app must start
        log.warning("Compare with %s runs on the torch engine: %s", name, exc)


class ChatEngine:
    """Holds one model and tokenizer; streams replies for chat messages."""

    def __init__(self, model, tokenizer, max_input_tokens: int = 1536, merged: bool = False, onnx=None):
        self.model = model
        self.onnx = onnx  # onnx_engine.OnnxModels by adapter name: the fast CPU path where it has the model
        self.tokenizer = tokenizer
        ctx = getattr(model.config, "max_position_embeddings", 2048) or 2048
        self.max_input_tokens = min(max_input_tokens, ctx - 64)
        self.lock = GENERATION_LOCK
        self.merged = merged  # an adapter merged into the weights: no base model, no switching
        self._system_tokens: dict[str, list[int]] = {}  # system prompt -> its leading tokens
        self._layers: tuple[list, list] | None = None  # (PEFT's adapter layers, the int8 LoRA ones)

    @property
    def adapters(self) -> list[str]:
        """Adapter names that can be chosen per request; BASE is available unless merged."""
        names = list(getattr(self.model, "peft_config", {}) or {})
        return names if self.merged else [BASE, *names]

    def add_adapter(self, adapter: str) -> str:
        """Load another adapter (folder or Hub id) next to the others; returns its name.

        Raises chatbot.loading.AdapterError for a missing adapter or one made for another base.
        Requests in flight finish first (the generation lock), so no reply mixes two adapters.
        """
        from . import int8
        from .loading import AdapterError, adapter_name, attach_adapter

        if self.merged:
            raise AdapterError("The adapter is merged into the weights (--merge): restart without --merge to switch.")
        name = adapter_name(adapter)
        if name in self.adapters:
            return name
        with self.lock:
            self.model = attach_adapter(self.model, adapter, name)
            self.model.eval()
            self._layers = None
            if any(isinstance(m, int8.Int8Linear) for m in self.model.modules()):
                int8.add_variants(self.model, [name])  # int8 base layers: a merged copy for fast decoding
        if self.onnx is not None:  # outside the lock: replies go on (on torch for this adapter) while it exports
            self._add_onnx(name, adapter)
        return name

    def _add_onnx(self, name: str, adapter: str) -> None:
        """The adapter's ONNX copy (exported once); on failure the torch path serves it."""
        from .loading import resolve_adapter
        from .onnx_engine import OnnxUnavailable

        folder = resolve_adapter(adapter)
        try:
            self.onnx.add({name: folder})
        except (OnnxUnavailable, OSError, RuntimeError) as exc:
            log.warning("Adapter %s runs on the torch engine: %s", name, exc)
            return
        add_pair(self.onnx, name, folder)

    def add_pairs(self) -> None:
        """Compare's ONNX pair models for the loaded adapters (built once, then loaded from the
        cache: about a second each, which the app spends after it is ready, in its warm-up). Until
        one is there, and where one fails, Compare runs on the torch engine."""
        if self.onnx is None or self.merged:
            return
        for name, adapter_dir in list(self.onnx.adapter_dirs.items()):
            if adapter_dir is not None and name not in self.onnx.pairs:
                add_pair(self.onnx, name, adapter_dir)

    def onnx_pair(self, adapters: tuple[str, str]) -> str | None:
        """The ONNX pair model that decodes (BASE, adapter) as Compare's two rows, or None (torch)."""
        if self.onnx is None or self.merged or adapters[0] != BASE:
            return None
        return adapters[1] if adapters[1] in self.onnx.pairs else None

    def onnx_name(self, adapter: str | None) -> str | None:
        """The ONNX model that serves `adapter` (None: the active one), or None for the torch path."""
        if self.onnx is None:
            return None
        if self.merged:  # one model, the adapter merged in
            return next(iter(self.onnx.models), None)
        if adapter == BASE or (adapter is None and not hasattr(self.model, "peft_config")):
            name = BASE
        else:
            name = adapter or self.model.active_adapter
        return name if name in self.onnx else None

    def prepare(self, messages: list[dict]) -> tuple[list[int], int]:
        return fit_to_context(self.tokenizer, messages, self.max_input_tokens)

    def shared_prefix(self, messages: list[dict], ids: list[int]) -> int:
        """How many leading tokens of `ids` are the system prompt's part of the chat template, the
        same in every conversation. The decoder keeps their keys and values between replies
        (`decoder.PREFIXES`), so a reply's prefill starts at the conversation; no conversation
        text is ever kept."""
        if not messages or messages[0].get("role") != "system":
            return 0
        system = messages[0]["content"]
        tokens = self._system_tokens.get(system)
        if tokens is None:  # the template up to where two different user messages part
            a, b = (encode(self.tokenizer, [messages[0], {"role": "user", "content": c}]) for c in ("a", "b"))
            tokens = a[: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))]
            if len(self._system_tokens) < 8:
                self._system_tokens[system] = tokens
        return len(tokens) if ids[: len(tokens)] == tokens else 0

    def use_adapter(self, adapter: str | None):
        """Context that runs the model as `adapter` (BASE: adapter off); hold `self.lock` around it."""
        from .int8 import select_variant

        if not hasattr(self.model, "peft_config"):
            if adapter not in (None, BASE):
                raise ValueError(f"No adapter {adapter!r} is loaded; the model runs without adapters.")
            return contextlib.nullcontext()
        if adapter == BASE:
            return self._adapters_off()  # int8 layers hold the base weights between requests
        name = adapter or self.model.active_adapter
        if name not in self.model.peft_config:
            raise ValueError(f"Unknown adapter {adapter!r}; loaded: {', '.join(self.adapters)}")
        if self.model.active_adapter != name:
            self.model.set_adapter(name)
        if select_variant(self.model, name, self._peft_layers()[1]):
            return self._merged_variant()
        return contextlib.nullcontext()

    def _peft_layers(self) -> tuple[list, list]:
        """PEFT's adapter layers and wrappers (what its disable_adapter switches), and the LoRA
        layers among them on int8 weights; found once per set of loaded adapters, not per reply
        (walking the model took about 50 ms of every reply's start)."""
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils.other import AuxiliaryTrainingWrapper

            from .int8 import _int8_lora_layers

            layers = [m for m in self.model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
            self._layers = (layers, _int8_lora_layers(self.model))
        return self._layers

    @contextlib.contextmanager
    def _adapters_off(self):
        """The base model: what PEFT's disable_adapter does for LoRA (every adapter layer and
        saved module off, then on again), on the layers found once."""
        layers = self._peft_layers()[0]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def pair_context(self, adapters: tuple[str, str]):
        """A context that runs a two-row batch as adapters[0] and adapters[1] from merged int8
        copies, or None where that is not possible (PEFT's per-row adapter_names then)."""
        from .int8 import BASE_VARIANT, select_pair, variant_ready

        names = tuple(BASE_VARIANT if a == BASE else a for a in adapters)
        if not hasattr(self.model, "peft_config"):
            return None
        layers = self._peft_layers()[1]
        if not all(variant_ready(self.model, n, layers) for n in names):
            return None

        @contextlib.contextmanager
        def run():
            if not select_pair(self.model, names, layers):
                raise RuntimeError(f"Adapters {adapters} are no longer loaded.")
            try:
                with self._adapters_off():
                    yield
            finally:
                select_pair(self.model, None, layers)

        return run()

    @contextlib.contextmanager
    def _merged_variant(self):
        """Adapter layers off while int8 layers run their merged copies; base weights back after."""
        from .int8 import BASE_VARIANT, select_variant

        try:
            with self._adapters_off():
                yield
        finally:
            select_variant(self.model, BASE_VARIANT, self._peft_layers()[1])

    def _generate_kwargs(self, ids: list[int], gen: GenerationConfig, stop: threading.Event) -> dict:
        import torch
        from transformers import StoppingCriteriaList

        input_ids = torch.tensor([ids], device=self.model.device)
        sample = gen.temperature > 0
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=gen.max_new_tokens,
            do_sample=sample,
            repetition_penalty=gen.repetition_penalty,
            stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if sample:
            kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    def start_generate(self, kwargs: dict, streamer, gen: GenerationConfig, stop: threading.Event,
                       adapter: str | None = None, context=None, shared_prefix: int = 0,
                       onnx_pair: str | None = None) -> tuple[threading.Thread, list[BaseException]]:
        """Run `generate` in a thread under the lock; errors are collected for the consumer to raise.

        `context` (entered under the lock) replaces the adapter selection, e.g. pair_context.
        `shared_prefix`: leading prompt tokens whose keys and values the decoder may keep and
        reuse (`shared_prefix()`). `onnx_pair`: decode a two-row batch on that ONNX pair model
        (`onnx_pair()`) instead.
        """
        import torch

        from . import decoder

        errors: list[BaseException] = []

        def run():
            try:
                with self.lock:  # adapter selection changes the shared model: only under the lock
                    if onnx_pair is not None:  # Compare's two rows on the ONNX pair model
                        from . import onnx_pair as pair

                        if gen.seed is not None:
                            torch.manual_seed(gen.seed)
                        if not stop.is_set():
                            try:
                                pair.generate(self.model, self.onnx.pairs[onnx_pair], streamer=streamer,
                                              shared_prefix=shared_prefix, **kwargs)
                            except Exception as exc:  # this reply fails; the next Compare runs on torch
                                self.onnx.pairs.pop(onnx_pair, None)
                                log.warning("Compare's ONNX pair model failed (%s); Compare runs on the torch engine",
                                            type(exc).__name__)
                                raise
                        return
                    onnx = self.onnx_name(adapter) if context is None and "adapter_names" not in kwargs else None
                    if onnx is not None:  # ONNX Runtime's own loop: no adapter switching on the torch model
                        if not stop.is_set():
                            self.onnx.generate(onnx, kwargs["input_ids"][0].tolist(), gen, stop, streamer,
                                               self.model.generation_config.eos_token_id, shared_prefix,
                                               self.model.generation_config.min_new_tokens)
                        return
                    ctx = context
                    if ctx is None:  # batched mixed adapters (adapter_names): PEFT picks per row
                        per_row = "adapter_names" in kwargs
                        ctx = contextlib.nullcontext() if per_row else self.use_adapter(adapter)
                    with torch.inference_mode(), ctx:
                        if gen.seed is not None:
                            torch.manual_seed(gen.seed)
                        if not stop.is_set():
                            if decoder.supports(self.model, kwargs):  # the same reply, less overhead
                                decoder.generate(self.model, streamer=streamer, shared_prefix=shared_prefix, **kwargs)
                            else:
                                self.model.generate(**kwargs, streamer=streamer)
            except BaseException as exc:  # surfaced to the consumer
                errors.append(exc)
            finally:
                streamer.end()

        thread = threading.Thread(target=run, name="generate", daemon=True)
        thread.start()
        return thread, errors

    def stream(
        self,
        messages: list[dict],
        gen: GenerationConfig | None = None,
        stop: threading.Event | None = None,
        adapter: str | None = None,
    ) -> Iterator[str]:
        """Yield the reply as text deltas. Closing the generator or setting `stop` halts decoding."""
        from transformers import TextIteratorStreamer

        gen = gen or GenerationConfig()
        stop = stop or threading.Event()
        ids, _ = self.prepare(messages)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generate_kwargs(ids, gen, stop)
        thread, errors = self.start_generate(kwargs, streamer, gen, stop, adapter,
                                             shared_prefix=self.shared_prefix(messages, ids))
        think = ThinkFilter()
        try:
            for delta in streamer:
                text = think.feed(delta)
                if text:
                    yield text
                if stop.is_set():
                    break
            tail = think.flush()
            if tail and not stop.is_set():
                yield tail
        finally:
            stop.set()  # the consumer is gone or done: free the model at the next token
            thread.join()
        if errors:
            raise errors[0]

    def reply(self, messages: list[dict], gen: GenerationConfig | None = None, adapter: str | None = None) -> str:
        """The whole reply as one string."""
        return "".join(self.stream(messages, gen, adapter=adapter)).strip()
