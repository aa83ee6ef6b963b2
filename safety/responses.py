"""The crisis response, written to safe-messaging practice, and the always-visible resources line.

Validation first; at least one way to call and one to text or chat for the region, an emergency
number, and the international directory; an invitation to keep talking; a plain statement that
this is an AI. Never any detail about methods or means.
"""

from __future__ import annotations

from .hotlines import Directory, Region, directory

COMMON_EMERGENCY = "112 (EU and many countries), 911 (US, Canada, Mexico), 999 (UK), 000 (Australia)"


def _text(value: str) -> str:
    """'988' -> 'text 988'; 'Text HOME to 741741' stays as written."""
    return value if value.split()[0].lower() in ("text", "sms", "whatsapp") else f"text {value}"


def _contacts(region: Region) -> list[str]:
    lines = []
    for s in region.services:
        ways = []
        if s.call:
            ways.append(f"call **{s.call}**")
        if s.text:
            ways.append(f"**{_text(s.text)}**")
        if s.chat:
            ways.append(f"chat: {s.chat}")
        lines.append(f"- {s.name}: {', '.join(ways)}")
    return lines


def crisis_response(region_code: str | None = None, about_other: bool = False, book: Directory | None = None) -> str:
    book = book or directory()
    region = book.get(region_code)
    fb = book.fallback
    if about_other:
        opening = (
            "I'm really glad you reached out about this. It sounds like someone you care about may "
            "be in danger, and that's a lot to carry. You don't have to handle it alone."
        )
        ask = ("If they might act on it soon, stay with them if you can do so safely, and contact "
               "emergency services or a crisis line together. Crisis lines also support people who are worried about someone else.")
    else:
        opening = (
            "I'm really sorry you're going through this. What you're feeling matters, and you "
            "deserve support right now. You don't have to go through it alone."
        )
        ask = "If you are in immediate danger or might act on these thoughts, please contact emergency services now."
    if region:
        where = f"**In {region.name}** (emergency: **{region.emergency}**):"
        contacts = _contacts(region)
    else:
        where = f"**Wherever you are** (emergency: {COMMON_EMERGENCY}):"
        contacts = []
    contacts.append(f"- Anywhere in the world: free, confidential helplines by phone, text or chat at {fb['chat']}")
    return "\n".join([
        opening,
        "",
        ask,
        "",
        where,
        *contacts,
        "",
        "Talking with a trained person can really help, and they are there 24/7 in most places. "
        "I'm still here too, and we can keep talking if you'd like. I'm an AI, not a counsellor or a "
        "substitute for professional care, so please also reach out to one of the services above.",
    ])


def resources_line(region_code: str | None = None, book: Directory | None = None) -> str:
    """One line that stays in view: the region's first call and text/chat contacts."""
    book = book or directory()
    region = book.get(region_code)
    if region is None:
        return (f"In crisis? Call your local emergency number ({COMMON_EMERGENCY}) or find a free "
                f"helpline at {book.fallback['chat']}.")
    call = next((s for s in region.services if s.call), None)
    text = next((s for s in region.services if s.text or s.chat), None)
    parts = [f"In crisis in {region.name}? Emergency: {region.emergency}"]
    if call:
        parts.append(f"{call.name}: call {call.call}")
    if text:
        parts.append(f"{text.name}: " + (_text(text.text) if text.text else f"chat {text.chat}"))
    parts.append(f"more at {book.fallback['chat']}")
    return " · ".join(parts)
