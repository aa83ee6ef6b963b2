"""Crisis-line numbers in a model's reply, checked against the hotline directory.

A small model invents numbers: the shipped one wrote "the National Suicide Prevention Lifeline,
1800 625 9436" in 2 of 409 replies to ordinary messages (round 26). A reply is not blocked for a
number: counsel-chat's therapists cite real lines the directory does not hold (Trans Lifeline,
Childhelp, state crisis lines). Instead the chat shows the verified resources beneath a reply
that names a crisis line beside a number the directory does not hold (chatbot/service.py).
"""

from __future__ import annotations

import re

from .hotlines import Directory, directory

CRISIS_LINE = re.compile(r"\b(?:hot ?line|help ?line|life ?line|crisis (?:line|text|cent(?:er|re)|service)|text line"
                         r"|samaritans|suicide prevention)", re.I)
NUMBER = re.compile(r"(?<![\w/.,])\+?\(?\d[\d ().-]*\d(?![\w/%])")
NEAR = 100  # characters either side of a crisis-line word


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def phone_like(group: str) -> bool:
    """A run of 3 or more digits (short codes: 988, 741741), not a year; or 7 or more digits with
    separators (1-800-273-8255), not a range such as 12-19."""
    digits = _digits(group)
    if group.strip("() +") == digits:
        return len(digits) >= 3 and not re.fullmatch(r"(?:19|20)\d\d", digits)
    return len(digits) >= 7


def known_numbers(book: Directory) -> frozenset[str]:
    """The digits of every number in the directory: each region's emergency numbers, and its
    services' calls, texts and chats (a WhatsApp number)."""
    fields = [r.emergency for r in book.regions.values()]
    fields += [f for r in book.regions.values() for s in r.services for f in (s.call, s.text, s.chat) if f]
    return frozenset(_digits(m.group()) for f in fields for m in NUMBER.finditer(f))


def unverified_numbers(text: str, book: Directory | None = None) -> list[str]:
    """Numbers written near a crisis-line word that the directory does not hold, in order, once each.
    A number with a country code in front of a known one (+44 116 123) counts as known."""
    lines = list(CRISIS_LINE.finditer(text))
    if not lines:  # most replies: no crisis line named, nothing to read
        return []
    known = known_numbers(book or directory())
    found: list[str] = []
    for line in lines:
        start = max(0, line.start() - NEAR)
        for m in NUMBER.finditer(text, start, line.end() + NEAR):
            group, digits = m.group().strip(), _digits(m.group())
            if not phone_like(group) or group in found:
                continue
            if digits in known or any(len(k) >= 6 and digits.endswith(k) for k in known):
                continue
            found.append(group)
    return found
