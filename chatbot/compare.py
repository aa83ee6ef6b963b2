"""Two models, one batch: the base model and an adapter answer the same prompt, a row each.

    for row, delta in stream_pair(engine, messages, gen, stop, ("base", "finetuned")):
        texts[row] += delta

Only one copy of the base weights is read and both answers decode together: a batch of two
costs little more than one (see `make bench`). On a CPU the rows run on the ONNX pair model
(`onnx_pair.py`, `ChatEngine.onnx_pair`); elsewhere on the torch engine, where with int8
weights each row runs its own weights from the shared int8 base (`ChatEngine.pair_context`),
and otherwise PEFT runs a different adapter per row (`adapter_names`, "__base__" for the adapter
switched off). Both rows share the prompt, the sampling settings and the seed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from .config import GenerationConfig
from .generation import BASE, ThinkFilter

PEFT_BASE = "__base__"
_DONE = object()


class RowStreamer:
    """A transformers streamer for a batch: decodes each row incrementally into (row, delta)."""

    def __init__(self, tokenizer, rows: int, eos_ids: set[int], out: queue.Queue):
        self.tokenizer = tokenizer
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.printed = [0] * rows
        self.finished = [False] * rows
        self.eos_ids = eos_ids
        self.out = out
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.tokens), -1)[:, -1].tolist()):
            if self.finished[row]:
                continue
            if token in self.eos_ids:
                self.finished[row] = True
                continue
            self.tokens[row].append(token)
            text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue  # half of a multi-byte character: wait for the rest
            delta, self.printed[row] = text[self.printed[row] :], len(text)
            if delta:
                self.out.put((row, delta))

    def end(self) -> None:
        self.out.put(_DONE)


def stream_pair(engine, messages: list[dict], gen: GenerationConfig | None, stop: threading.Event | None,
                adapters: tuple[str, str]) -> Iterator[tuple[int, str]]:
    """Yield (row, text delta) for both adapters as they decode; closing the generator stops both."""
    gen = gen or GenerationConfig()
    stop = stop or threading.Event()
    names = [PEFT_BASE if a == BASE else a for a in adapters]
    model = engine.model
    pair = engine.onnx_pair(tuple(adapters))  # the ONNX pair model where there is one
    for name in names:
        if pair is None and name != PEFT_BASE and name not in getattr(model, "peft_config", {}):
            raise ValueError(f"No adapter {name!r} is loaded for comparison.")
    ids, _ = engine.prepare(messages)
    out: queue.Queue = queue.Queue()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {engine.tokenizer.eos_token_id}
    streamer = RowStreamer(engine.tokenizer, 2, eos_ids - {None}, out)
    kwargs = engine._generate_kwargs(ids, gen, stop)
    kwargs["input_ids"] = kwargs["input_ids"].repeat(2, 1)
    kwargs["attention_mask"] = kwargs["attention_mask"].repeat(2, 1)
    # int8 on CPU: each row runs its own merged int8 weights in one forward pass; otherwise PEFT
    # picks the adapter per row (adapter_names) on the shared base weights
    context = None if pair else engine.pair_context(tuple(adapters))
    if context is None and pair is None:
        kwargs["adapter_names"] = names
    thread, errors = engine.start_generate(kwargs, streamer, gen, stop, adapter=None, context=context,
                                           shared_prefix=engine.shared_prefix(messages, ids), onnx_pair=pair)
    filters = [ThinkFilter(), ThinkFilter()]
    try:
        while (item := out.get()) is not _DONE:
            row, delta = item
            text = filters[row].feed(delta)
            if text:
                yield row, text
            if stop.is_set():
                break
        for row, f in enumerate(filters):
            if (tail := f.flush()) and not stop.is_set():
                yield row, tail
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]


PASSED, WITHHELD, FAILED = "passed", "withheld", "error"


class _Withheld:
    """Stands in for a guard event when the guard itself failed: fail closed."""

    def __init__(self, response: str):
        self.replace, self.text = response, ""


def compare(service, message, region: str | None = None, adapter: str | None = None,
            stop: threading.Event | None = None, gen: GenerationConfig | None = None) -> Iterator[dict]:
    """Screen `message` once, then stream base and adapter replies, each through the output check.

    Yields {"base": text, "finetuned": text, "status": [s0, s1], "crisis": bool}; status is
    'streaming', 'passed', 'withheld' (the output check replaced the reply with the crisis response)
    or 'error'. A crisis message yields the crisis response once, with crisis=True and no replies.
    """
    from .prompts import build_messages
    from .service import EMPTY_REPLY, ERROR_NOTICE, NO_REPLY, clean_message, number_note

    full = clean_message(message)
    if not full:
        yield {"base": EMPTY_REPLY, "finetuned": EMPTY_REPLY, "status": [PASSED, PASSED], "crisis": False}
        return
    text, notice = service.prepare(full)
    verdict = service.guard.check_input(full, None)
    if verdict.crisis:
        response = service.crisis_reply(verdict, region)
        yield {"base": response, "finetuned": response, "status": [WITHHELD, WITHHELD], "crisis": True}
        return
    stop = stop or threading.Event()
    adapter = adapter or service.default_adapter()
    if adapter in (None, BASE):
        raise ValueError("No fine-tuned adapter is loaded to compare with: start the app with --adapter.")
    pairs = stream_pair(service.engine, build_messages([], text), gen or service.gen, stop, (BASE, adapter))
    texts, status = ["", ""], ["streaming", "streaming"]
    for row, event in _guarded(pairs, service.guard, region, stop):
        if event == FAILED:
            status = [FAILED if s == "streaming" else s for s in status]
            texts = [t + ("\n\n" if t else "") + ERROR_NOTICE for t in texts]
            break
        if event is None:  # this row is finished
            status[row] = PASSED if status[row] == "streaming" else status[row]
            texts[row] = texts[row] if texts[row].strip() else NO_REPLY
            if status[row] == PASSED:
                texts[row] += number_note(service.guard, texts[row], region)
        elif event.replace is not None:
            texts[row], status[row] = event.replace, WITHHELD
        else:
            texts[row] += event.text
        yield {"base": notice + texts[0], "finetuned": notice + texts[1], "status": list(status), "crisis": False}
    yield {"base": notice + texts[0], "finetuned": notice + texts[1], "status": list(status), "crisis": False}


def _guarded(pairs: Iterator[tuple[int, str]], guard, region, stop: threading.Event):
    """Run guard.stream on each row of a pair stream; yield (row, StreamEvent | None at the end).

    The generator of pairs is drained by one thread into a queue per row; each row's guard runs in
    its own thread, so a sentence held back for checking in one row never delays the other.
    """
    rows = [queue.Queue(), queue.Queue()]
    events: queue.Queue = queue.Queue()

    def feed():
        try:
            for row, delta in pairs:
                rows[row].put(delta)
        except Exception:  # noqa: BLE001 - reported to the consumer as one failure
            events.put((None, FAILED))
        finally:
            for q in rows:
                q.put(_DONE)

    def deltas(row):
        while (d := rows[row].get()) is not _DONE:
            yield d

    def watch(row):
        try:
            for event in guard.stream(deltas(row), region):
                events.put((row, event))
                if event.replace is not None:
                    break
        except Exception:  # noqa: BLE001 - the guard fails closed: treat as withheld
            events.put((row, _Withheld(guard.crisis_response(region))))
        finally:
            events.put((row, None))

    threads = [threading.Thread(target=feed, daemon=True)] + [threading.Thread(target=watch, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    open_rows = {0, 1}
    withheld = set()
    try:
        while open_rows:
            row, event = events.get()
            if event == FAILED:
                yield None, FAILED
                return
            if event is None:
                open_rows.discard(row)
            elif event.replace is not None:
                withheld.add(row)
                if withheld == {0, 1}:
                    stop.set()  # neither reply will be shown: stop decoding
            yield row, event
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
