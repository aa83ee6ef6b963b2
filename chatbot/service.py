"""One chat turn, end to end: clean the message, screen it, stream a screened reply.

UI-agnostic: app.py, the API endpoints, the benchmark and the load test all call this. The guard
is passed in (anything with check_input, stream, crisis_response and resources_line; in the app,
safety.Guard), so this package never imports the safety layer's internals.

Nothing here writes message text to disk or logs.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import unicodedata
from collections.abc import Iterator

from .config import GenerationConfig, Limits
from .generation import BASE, ChatEngine
from .prompts import build_messages

log = logging.getLogger(__name__)

EMPTY_REPLY = "It looks like that message was empty. Take your time. What's on your mind?"
TRIMMED_NOTICE = "*(Your message was long, so I read the first {n:,} characters.)*\n\n"
UNSCREENED_NOTICE = ("*(Your message was longer than the safety check can read ({n:,} characters at most), "
                     "so to be safe here are the crisis resources. You can send it again in shorter parts.)*\n\n")
ERROR_NOTICE = ("*Sorry, something went wrong while I was writing that reply. Your conversation is "
                "kept; please try sending your message again.*")
NO_REPLY = "I'm here and listening. Could you tell me a little more?"
UNVERIFIED_NOTE = ("*The reply above gives a phone number for a crisis line that this app could not check: an AI "
                   "can get numbers wrong. Checked crisis lines:* ")
# when the number check itself fails: the same resources, without claiming the reply has a number
UNCHECKED_NOTE = ("*This app could not check the reply above for crisis-line numbers: an AI can get numbers "
                  "wrong. Checked crisis lines:* ")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def clean_message(message) -> str:
    """Make any input a safe plain string: no lone surrogates or control characters."""
    if message is None:
        return ""
    if not isinstance(message, str):
        message = str(message)
    message = message.encode("utf-8", "replace").decode("utf-8")
    message = _CONTROL.sub(" ", unicodedata.normalize("NFC", message))
    return message.strip()


def number_note(guard, reply: str, region: str | None) -> str:
    """A footer with the checked crisis lines when a reply gives a crisis line's number that the
    hotline directory does not hold (safety/numbers.py), or when that check failed; else ""."""
    found = getattr(guard, "unverified_numbers", lambda _: [])(reply)
    if not found:
        return ""
    failed = found == [getattr(guard, "NUMBERS_UNCHECKED", object())]
    return "\n\n---\n" + (UNCHECKED_NOTE if failed else UNVERIFIED_NOTE) + guard.resources_line(region)


class ChatService:
    def __init__(self, engine: ChatEngine, guard, gen: GenerationConfig | None = None, limits: Limits | None = None):
        self.engine = engine
        self.guard = guard
        self.gen = gen or GenerationConfig()
        self.limits = limits or Limits()

    def default_adapter(self) -> str | None:
        """The adapter a request without one uses: the first loaded, or None for the base model."""
        names = [a for a in getattr(self.engine, "adapters", []) if a != BASE]
        return names[0] if names else None

    def warm_up(self) -> None:
        """Read the system prompt into the default chat model, load Compare's ONNX pair models
        (`ChatEngine.add_pairs`), and read it into Compare's pair, at the default settings, so the first reply after a start is not the slow one (a 147-token prompt, kept
        or not: 0.09–0.16 against 0.44–0.53 s to the first token on the ONNX engine in `make bench`). A
        one-token reply to a fixed greeting; as after any reply, only the system prompt's keys
        and values stay. Runs under the generation lock; a failure is logged and changes nothing."""
        from .compare import stream_pair

        gen = dataclasses.replace(self.gen, max_new_tokens=1)
        messages = build_messages([], "Hello")
        adapter = self.default_adapter() or BASE
        try:
            for _ in self.engine.stream(messages, gen, adapter=adapter):
                pass
            self.engine.add_pairs()  # Compare's ONNX pair models, where the app decodes on ONNX
            if adapter != BASE and BASE in self.engine.adapters:
                for _ in stream_pair(self.engine, messages, gen, None, (BASE, adapter)):
                    pass
        except Exception as exc:  # noqa: BLE001 - the first reply is merely slower
            log.warning("warm-up failed (%s); the first reply reads the system prompt itself", type(exc).__name__)

    def prepare(self, message) -> tuple[str, str]:
        """(text the model will read, notice to show) for a raw message."""
        text = clean_message(message)
        if len(text) > self.limits.max_input_chars:
            return text[: self.limits.max_input_chars], TRIMMED_NOTICE.format(n=self.limits.max_input_chars)
        return text, ""

    def crisis_reply(self, verdict, region: str | None = None) -> str:
        """The crisis response for a flagged message; for one too long to screen, with a line on why."""
        response = self.guard.crisis_response(region, about_other=verdict.category == "other", language=verdict.language)
        from safety.guard import MAX_MESSAGE_CHARS, TOO_LONG

        if f"error:{TOO_LONG}" in verdict.reasons:
            return UNSCREENED_NOTICE.format(n=MAX_MESSAGE_CHARS) + response
        return response

    def respond(
        self,
        message,
        history: list[dict] | None = None,
        conversation=None,
        region: str | None = None,
        adapter: str | None = None,
        stop: threading.Event | None = None,
        gen: GenerationConfig | None = None,
    ) -> Iterator[str]:
        """Yield the assistant's reply so far (cumulative Markdown), screened before and after."""
        full = clean_message(message)
        if not full:
            yield EMPTY_REPLY
            return
        text, notice = self.prepare(full)
        verdict = self.guard.check_input(full, conversation)  # the whole message, not just what the model reads
        if verdict.crisis:
            yield self.crisis_reply(verdict, region)
            return
        messages = build_messages(history or [], text)
        reply = ""
        try:
            adapter = adapter or self.default_adapter() or BASE
            deltas = self.engine.stream(messages, gen or self.gen, stop=stop, adapter=adapter)
            for event in self.guard.stream(deltas, region, conversation=conversation):
                if event.replace is not None:
                    if conversation is not None:
                        conversation.at_risk = True
                    yield event.replace
                    return
                reply += event.text
                yield notice + reply
        except Exception as exc:  # noqa: BLE001 - the user gets a short message, the app keeps serving
            log.error("generation failed: %s", type(exc).__name__)
            yield notice + (reply + "\n\n" if reply else "") + ERROR_NOTICE
            return
        if not reply.strip():
            reply = "" if stop is not None and stop.is_set() else NO_REPLY
        footer = number_note(self.guard, reply, region)
        if not footer and conversation is not None and getattr(conversation, "at_risk", False):
            footer = "\n\n---\n" + self.guard.resources_line(region)
        yield notice + reply + footer

    def reply(self, message, **kwargs) -> str:
        """The final text of respond()."""
        out = ""
        for out in self.respond(message, **kwargs):
            pass
        return out
