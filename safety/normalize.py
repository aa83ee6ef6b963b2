"""Text normalisation before any safety check.

Undoes the disguises people (and models) use: Unicode look-alikes (full-width letters, and Cyrillic
or Greek letters among Latin ones), zero-width and bidi characters, typographic quotes, markup
(`**kill**`, `<b>`), leetspeak, s p a c e d letters, stretched letters, common misspellings and
algospeak ("kms", "unalive", "sewerslide", "commit sudoku"). Accents are removed so the
multilingual lexicon needs one spelling per word.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import yaml

DATA = Path(__file__).parent / "data"

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u2032": "'", "`": "'", "\u00b4": "'",
                         "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-", "\u0142": "l", "\u0141": "l"})
_QUOTES_ONLY = {k: v for k, v in _QUOTES.items() if k not in (0x142, 0x141)}  # keeps "ł"
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i", "|": "l"})
_TOKEN = re.compile(r"\S+")
_HAS_ALPHA = re.compile(r"[a-z]")
_LEETABLE = re.compile(r"[013457@$!|]")
# three or more single letters separated by one space, dot, dash or underscore: "k i l l", "d.i.e"
_SPACED = re.compile(r"\b(?:[a-z][ ._\-]){2,}[a-z]\b")
_RUN3 = re.compile(r"([a-z])\1{2,}")
_RUN2 = re.compile(r"([a-z])\1+")
_WS = re.compile(r"\s+")
_TAG = re.compile(r"</?[a-z][a-z0-9]*(?:\s[^<>]{0,80})?/?>")  # an HTML tag: "<b>", "</span>", "<br/>"
_EMPHASIS = re.compile(r"[*~]+")  # Markdown emphasis and strike-through: "**kill**", "k*i*l*l"
_LATIN = re.compile(r"[a-z]")
_CYRILLIC_GREEK = re.compile(r"[\u0370-\u03ff\u0400-\u052f]")


@lru_cache(maxsize=1)
def _data() -> dict:
    return yaml.safe_load((DATA / "normalize.yaml").read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def _replacements() -> list[tuple[str, re.Pattern, str]]:
    """Algospeak and misspellings from data/normalize.yaml, longest first: (key, pattern, replacement)."""
    table = _data()["replacements"]
    items = sorted(table.items(), key=lambda kv: -len(kv[0]))
    return [(k, re.compile(r"(?<![a-z])" + re.escape(k) + r"(?![a-z])"), v) for k, v in items]


@lru_cache(maxsize=1)
def _lookalikes() -> dict[int, str]:
    """Cyrillic and Greek letters that look like Latin ones, from data/normalize.yaml."""
    return str.maketrans(_data()["lookalikes"])


def _unspoof(text: str) -> str:
    """Look-alike Cyrillic and Greek letters read as Latin: in every word of a message written mostly
    in Latin letters, else only in words that mix them with Latin ones. (Lower case, accents gone.)"""
    if not _CYRILLIC_GREEK.search(text):
        return text
    table = _lookalikes()
    if len(_LATIN.findall(text)) > len(_CYRILLIC_GREEK.findall(text)):
        return text.translate(table)
    return _TOKEN.sub(lambda m: m.group(0).translate(table) if _LATIN.search(m.group(0)) else m.group(0), text)


def _strip_invisible(text: str) -> str:
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cf", "Cs", "Co", "Cn"):  # zero-width, bidi overrides, lone surrogates, private use
            continue
        if cat == "Cc":  # control characters: keep line structure as spaces
            out.append(" ")
            continue
        out.append(ch)
    return "".join(out)


def _clean(text: str, quotes: dict) -> str:
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates become '?'
    return _strip_invisible(unicodedata.normalize("NFKC", text)).translate(quotes)


def light(text: str) -> str:
    """Unicode clean-up that keeps accents and case: NFKC, invisible characters, quotes,
    whitespace. For the multilingual embedder, where accents carry meaning (Vietnamese), and
    removing them takes Hangul apart into its letters; the lexicon reads the full normalisation."""
    return _WS.sub(" ", _clean(text, _QUOTES_ONLY)).strip()


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _deleet(token: str) -> str:
    if _HAS_ALPHA.search(token) and _LEETABLE.search(token):
        core = token.strip(".,;:?\"'()[]")
        if core and _HAS_ALPHA.search(core):
            return token.replace(core, core.translate(_LEET))
    return token


def basic(text: str) -> str:
    """Unicode clean-up only: NFKC, invisible characters, quotes, case, accents, look-alike letters,
    markup, whitespace."""
    text = _unspoof(_strip_accents(_clean(text, _QUOTES).casefold()))
    return _WS.sub(" ", _EMPHASIS.sub(" ", _TAG.sub("", text))).strip()


def _expand(text: str) -> str:
    for key, pattern, repl in _replacements():
        if key in text:  # a substring test first: a check runs this on every streamed sentence
            text = pattern.sub(repl, text)
    return text


def variants(text: str) -> list[str]:
    """Normalised forms of text to match against: stretched letters squeezed to two and to one."""
    text = basic(text)
    text = " ".join(_deleet(t) for t in _TOKEN.findall(text))
    text = _SPACED.sub(lambda m: re.sub(r"[ ._\-]", "", m.group(0)), text)
    two = _expand(_RUN3.sub(r"\1\1", text))
    one = _expand(_RUN2.sub(r"\1", text))
    return [two] if one == two else [two, one]


def normalize(text: str) -> str:
    """The main normalised form (used for the embedding classifier)."""
    return variants(text)[0]
