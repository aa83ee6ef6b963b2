"""Fit the classifier heads on data/examples.yaml and choose their thresholds.

    python -m safety fit

The threshold is chosen on out-of-fold predictions (5-fold cross-validation over the examples
file, the development split): the highest threshold that keeps recall at or above the target.
The evaluation sets (testset.yaml and the public sets) are never read here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .classifier import DEFAULT_EMBEDDER, EXAMPLES_FILE, HEADS_FILE, examples_digest, load_embedder, load_examples
from .lexicon import default_lexicon
from .normalize import normalize

# input: recall first (a miss can cost a life); output: no false blocks on the dev split, since
# replacing a supportive reply with a hotline card teaches people to stop talking.
TARGET_RECALL = {"input": 0.97, "output": None}
C = 16.0


def _threshold(labels: np.ndarray, probs: np.ndarray, lexicon_hits: np.ndarray, target: float | None) -> float:
    """Threshold for the combined decision (lexicon OR classifier) on out-of-fold scores.

    With a recall target: among thresholds whose combined recall reaches it, those with the
    lowest false-positive rate, and of those the lowest (the most recall margin). Without one:
    the lowest threshold with no false positive.
    """
    best = None
    for t in np.unique(np.concatenate([probs, [0.5]])):
        if not 0.05 <= t <= 0.95:
            continue
        flagged = lexicon_hits | (probs >= t)
        recall, fpr = flagged[labels == 1].mean(), flagged[labels == 0].mean()
        if target is None:
            if fpr == 0:
                return float(t)
        elif recall >= target and (best is None or fpr < best[1] - 1e-9):
            best = (float(t), fpr)
    return best[0] if best else 0.95


def fit(examples: Path = EXAMPLES_FILE, out: Path = HEADS_FILE, embedder: str = DEFAULT_EMBEDDER, seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    model = load_embedder(embedder)
    heads, report = {}, {}
    for stage in ("input", "output"):
        rows = load_examples(examples, stage)
        texts = [normalize(t) for t, _, _ in rows]
        y = np.array([label for _, label, _ in rows])
        x = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        clf = LogisticRegression(C=C, class_weight="balanced", max_iter=2000)
        folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
        oof = cross_val_predict(clf, x, y, cv=folds, method="predict_proba")[:, 1]
        lexicon = default_lexicon()
        hits = np.array([any(h.severity == "high" for h in lexicon.match(t, stage)) for t, _, _ in rows])
        threshold = _threshold(y, oof, hits, TARGET_RECALL[stage])
        clf.fit(x, y)
        pred = hits | (oof >= threshold)
        report[stage] = {
            "examples": len(y),
            "lexicon_recall": round(float(hits[y == 1].mean()), 4),
            "cv_recall": round(float(pred[y == 1].mean()), 4),
            "cv_false_positive_rate": round(float(pred[y == 0].mean()), 4),
        }
        heads[stage] = {"coef": clf.coef_[0].round(6).tolist(), "intercept": float(clf.intercept_[0]), "threshold": threshold}
    result = {"embedder": embedder, "examples_sha256": examples_digest(examples), "heads": heads, "cv": report}
    Path(out).write_text(json.dumps(result) + "\n")
    return {"thresholds": {s: round(h["threshold"], 4) for s, h in heads.items()}, "cv": report}
