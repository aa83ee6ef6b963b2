"""The crisis lexicon (data/lexicon.yaml): phrase patterns with category and severity."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from .normalize import variants

LEXICON_FILE = Path(__file__).parent / "data" / "lexicon.yaml"
STAGES = ("input", "output")
SEVERITIES = ("high", "medium")
_CLAUSE = re.compile(r"[.!?;,:]")  # where a clause ends, for negation
_ENGLISH_CLAUSE = re.compile(r"[.!?;,:]|\bbut\b|\bjust\b|\band\b")


@dataclass(frozen=True)
class Entry:
    id: str
    category: str
    severity: str
    negatable: bool
    pattern: re.Pattern
    lang: str = "en"
    wary: bool = False  # read only in a marked conversation (output entries, round 24)


@dataclass(frozen=True)
class Hit:
    id: str
    category: str
    severity: str
    text: str  # the matched (normalised) span
    negated: bool = False  # negated or in a recovery statement: not current risk
    lang: str = "en"  # the entry's language

    @property
    def reason(self) -> str:
        return f"lexicon:{self.category}:{self.id}"


class Lexicon:
    def __init__(self, path: Path = LEXICON_FILE):
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        self.negators = re.compile(data["negators"])
        self.negation_words = int(data.get("negation_words", 4))
        self.recovery = re.compile(data.get("recovery", r"(?!)"))
        self.relapse = re.compile(data.get("relapse", r"(?!)"))
        self.not_negations = re.compile(data.get("not_negations", r"(?!)"))
        self.negation_phrases = re.compile(data.get("negation_phrases", r"(?!)"))
        self.negated_after = re.compile(data.get("negated_after", r"(?!)"))
        self.idioms = [re.compile(p) for p in data.get("idioms", [])]
        self.means_questions = [(raw["id"], re.compile(raw["pattern"])) for raw in data.get("means_questions", [])]
        self.means_purposes = re.compile(data.get("means_purposes", r"(?!)"))
        self.farewell_signs = [(raw["id"], re.compile(raw["pattern"])) for raw in data.get("farewell_signs", [])]
        self.farewell_reasons = re.compile(data.get("farewell_reasons", r"(?!)"))
        # replies in other languages: a negator of the entry's language shortly before the match
        self.output_negators = {lang: re.compile(p) for lang, p in data.get("output_negators", {}).items()}
        self.entries: dict[str, list[Entry]] = {}
        for stage in STAGES:
            entries = []
            for raw in data[stage]:
                if raw["severity"] not in SEVERITIES:
                    raise ValueError(f"{path}: entry {raw['id']}: severity must be one of {SEVERITIES}")
                if raw.get("wary") and stage != "output":  # a marked conversation lowers the input bar instead
                    raise ValueError(f"{path}: entry {raw['id']}: only output entries can be wary")
                if ("pattern" in raw) == ("patterns" in raw):
                    raise ValueError(f"{path}: entry {raw['id']}: give either pattern or a list of patterns")
                pattern = raw.get("pattern") or "|".join(f"(?:{p})" for p in raw["patterns"])
                entries.append(
                    Entry(raw["id"], raw["category"], raw["severity"], bool(raw.get("negatable")),
                          re.compile(pattern), raw.get("lang", "en"), bool(raw.get("wary")))
                )
            self.entries[stage] = entries

    def _last_words(self, clause: str) -> str:
        """The few words of a clause that a negator must be among (`negation_words`)."""
        return " ".join(clause.split()[-self.negation_words :])

    def _negated(self, text: str, start: int, end: int) -> bool:
        """A negator among the few words before the match, in the same clause; a longer negating
        phrase that ends at the match; or a negation right after it ("... isn't something I'd do")."""
        clause = _ENGLISH_CLAUSE.split(text[:start])[-1]
        if self.not_negations.search(clause):
            return False
        return bool(self.negators.search(self._last_words(clause)) or self.negation_phrases.search(clause)
                    or self.negated_after.match(text[end : end + 60]))

    def _denied_reply(self, text: str, start: int, lang: str) -> bool:
        """A reply in another language that denies or reports what follows: a negator or "you feel
        that" of its language among the few words before the match, in the same clause ("no tomes
        todas las pastillas", "Bitte nimm nicht alle Tabletten auf einmal")."""
        clause = _CLAUSE.split(text[:start])[-1]
        return bool(self.output_negators[lang].search(self._last_words(clause)))

    def _idiom(self, text: str, start: int, end: int) -> bool:
        """True when an idiom overlaps the match: "I could die of embarrassment"."""
        lo = max(0, start - 12)
        span = text[lo : end + 40]
        return any(m.start() + lo < end and m.end() + lo > start for p in self.idioms for m in p.finditer(span))

    def softened(self, text: str, forms: list[str] | None = None) -> bool:
        """A figure of speech or a recovery statement in the text ("so bored I could die", "clean
        for three years"): the guard then asks the classifier to be much surer. `forms`: the text's
        `variants`, where the caller has them (each method here takes them, so a check of a long
        message normalises it once)."""
        forms = _forms(text, forms)
        return any(self._recovered(form) or any(p.search(form) for p in self.idioms) for form in forms)

    def means_question(self, text: str, forms: list[str] | None = None) -> str | None:
        """The id of the first means question in the text ("what are the tallest bridges around
        here?", round 21), or None: none, or the text gives a harmless purpose ("the safest dose for
        a headache", "we're visiting, which tower has the best view?"). Not risk alone: the guard
        weighs it with the conversation."""
        return _first_sign(_forms(text, forms), self.means_questions, self.means_purposes)

    def farewell(self, text: str, forms: list[str] | None = None) -> str | None:
        """The id of the first farewell or last arrangement in the text ("this is the last time I'll
        be writing here", "who takes care of your pets when you die?", round 22), or None: none, or
        the text says it is for now or gives a reason ("bye for now", "we're moving"). Not risk
        alone: the guard weighs it with the conversation, as a means question."""
        return _first_sign(_forms(text, forms), self.farewell_signs, self.farewell_reasons)

    def warning_sign(self, text: str, forms: list[str] | None = None) -> str | None:
        """'means_question:<id>' or 'farewell:<id>' for the first sign in the text, else None."""
        forms = _forms(text, forms)
        means = self.means_question(text, forms)
        if means:
            return f"means_question:{means}"
        farewell = self.farewell(text, forms)
        return f"farewell:{farewell}" if farewell else None

    def _recovered(self, text: str) -> bool:
        """A recovery statement, and no word of relapse anywhere in the text."""
        return bool(self.recovery.search(text)) and not self.relapse.search(text)

    def match(self, text: str, stage: str = "input", negated: bool = False, wary: bool = False,
              languages: set[str] | None = None, forms: list[str] | None = None) -> list[Hit]:
        """Hits in text; with negated=True, negated hits (flagged) are returned too. Entries marked
        `wary` are read only with wary=True (a conversation that has shown risk); with `languages`,
        only entries in those languages are read."""
        hits: dict[str, Hit] = {}
        negated_hits: dict[str, Hit] = {}
        for form in _forms(text, forms):
            for entry in self.entries[stage]:
                if entry.id in hits or (entry.wary and not wary) or (languages and entry.lang not in languages):
                    continue
                for m in entry.pattern.finditer(form):
                    if self._idiom(form, m.start(), m.end()):
                        continue
                    denied = entry.negatable and (self._denied_reply(form, m.start(), entry.lang)
                                                  if stage == "output" and entry.lang in self.output_negators
                                                  else self._negated(form, m.start(), m.end()) or self._recovered(form))
                    if denied and entry.id not in negated_hits:
                        negated_hits[entry.id] = Hit(entry.id, entry.category, entry.severity, m.group(0), True, entry.lang)
                        continue
                    if not denied:
                        hits[entry.id] = Hit(entry.id, entry.category, entry.severity, m.group(0), lang=entry.lang)
                        break
        extra = [h for k, h in negated_hits.items() if k not in hits] if negated else []
        return list(hits.values()) + extra


def _forms(text: str, forms: list[str] | None) -> list[str]:
    """The text's `variants`, or those the caller already has (a check normalises a message once)."""
    return variants(text) if forms is None else forms


def _first_sign(forms: list[str], signs: list[tuple[str, re.Pattern]], excuse: re.Pattern) -> str | None:
    """The id of the first of `signs` in any form of a text, or None where `excuse` is found in one."""
    if any(excuse.search(form) for form in forms):
        return None
    return next((name for name, p in signs for form in forms if p.search(form)), None)


@lru_cache(maxsize=1)
def default_lexicon() -> Lexicon:
    return Lexicon()
