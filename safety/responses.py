"""The crisis response, written to safe-messaging practice, and the always-visible resources line.

Validation first; at least one way to call and one to text or chat for the region, an emergency
number, and the international directory; an invitation to keep talking; a plain statement that
this is an AI. Never any detail about methods or means. The words are in data/responses.yaml, in
English and the lexicon's seven other languages; the services come from the hotline directory.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from .hotlines import Directory, Region, directory

RESPONSES_FILE = Path(__file__).parent / "data" / "responses.yaml"


@lru_cache(maxsize=1)
def _words() -> dict[str, dict[str, str]]:
    return yaml.safe_load(RESPONSES_FILE.read_text(encoding="utf-8"))


def _text(value: str, verb: str) -> str:
    """'988' -> 'text 988'; 'Text HOME to 741741' stays as written."""
    return value if value.split()[0].lower() in ("text", "sms", "whatsapp") else f"{verb} {value}"


def _contacts(region: Region, words: dict[str, str]) -> list[str]:
    lines = []
    for s in region.services:
        ways = []
        if s.call:
            ways.append(f"{words['call']} **{s.call}**")
        if s.text:
            ways.append(f"**{_text(s.text, words['text'])}**")
        if s.chat:
            ways.append(f"{words['chat']}: {s.chat}")
        lines.append(f"- {s.name}: {', '.join(ways)}")
    return lines


def crisis_response(region_code: str | None = None, about_other: bool = False, book: Directory | None = None,
                    language: str = "en") -> str:
    """The crisis response for a region, in `language` where it is written in it (else English)."""
    book = book or directory()
    words = _words().get(language) or _words()["en"]
    region = book.get(region_code)
    fb = book.fallback
    opening = words["opening_other" if about_other else "opening"]
    ask = words["ask_other" if about_other else "ask"]
    if region:
        where = words["in_region"].format(region=region.name, emergency=region.emergency)
        contacts = _contacts(region, words)
    else:
        where = words["anywhere"].format(emergency=words["emergency_numbers"])
        contacts = []
    contacts.append("- " + words["worldwide"].format(url=fb["chat"]))
    return "\n".join([opening, "", ask, "", where, *contacts, "", words["closing"]])


def resources_line(region_code: str | None = None, book: Directory | None = None) -> str:
    """One line that stays in view: the region's first call and text/chat contacts."""
    book = book or directory()
    region = book.get(region_code)
    if region is None:
        return (f"In crisis? Call your local emergency number ({_words()['en']['emergency_numbers']}) or find a free "
                f"helpline at {book.fallback['chat']}.")
    call = next((s for s in region.services if s.call), None)
    text = next((s for s in region.services if s.text or s.chat), None)
    parts = [f"In crisis in {region.name}? Emergency: {region.emergency}"]
    if call:
        parts.append(f"{call.name}: call {call.call}")
    if text:
        parts.append(f"{text.name}: " + (_text(text.text, "text") if text.text else f"chat {text.chat}"))
    parts.append(f"more at {book.fallback['chat']}")
    return " · ".join(parts)
