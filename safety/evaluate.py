"""Measure the guard: recall, false-positive rate and latency per category.

    python -m safety evaluate [--data ../shared/data/eval] [--json out.json] [--per-subreddit N]

Sets: the project's own held-out test sets (data/testset.yaml, with its two-message conversations;
data/testset_languages.yaml, in other languages than English), XSTest's safe prompts, the Reddit
Mental Health Dataset sample's test part (r/SuicideWatch against control and support subreddits,
post level; safety/reddit.py),
the C-SSRS Reddit set (recall by severity, user level), counsel-chat's test-split questions
(ordinary requests for help: how many are flagged) and its therapists' answers to them (supportive
replies: how many the stream wrapper replaces). Only aggregate figures are printed.
"""

from __future__ import annotations

import ast
import csv
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

from .counsel import COUNSEL_FILE, answers, counsel_root, questions
from .guard import ConversationState, Guard, word_deltas
from .reddit import CRISIS_SUBREDDIT, group_of, posts

TESTSET = Path(__file__).parent / "data" / "testset.yaml"
TESTSET_LANGUAGES = Path(__file__).parent / "data" / "testset_languages.yaml"
DEVSET = Path(__file__).parent / "data" / "devset.yaml"


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def own_testset(guard: Guard, path: Path = TESTSET, mistakes: list | None = None) -> dict:
    """Per-category results on a labelled YAML set; `mistakes` collects wrong texts (dev set only).
    The replies are read twice: as in a new conversation ('output'), and as in a marked one, where
    risk has shown ('output_marked', round 23)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    rows, latencies = [], []
    stages = [s for s in ("input", "output") if s in data] + (["output_marked"] if "output" in data else [])
    for stage in stages:
        for label, groups in data[stage.removesuffix("_marked")].items():
            positive = label in ("crisis", "unsafe")
            for category, texts in groups.items():
                flags = []
                for text in texts:
                    started = time.perf_counter()
                    if stage == "input":
                        verdict = guard.check_input(text, ConversationState())
                    else:
                        verdict = guard.check_output(text, ConversationState(at_risk=stage == "output_marked"))
                    latencies.append((stage, time.perf_counter() - started))
                    flags.append(verdict.crisis)
                    if mistakes is not None and verdict.crisis != positive:
                        mistakes.append((stage, label, category, text, verdict.reasons))
                rows.append({"stage": stage, "label": label, "category": category, "n": len(flags),
                             "metric": "recall" if positive else "false_positive_rate", "value": _rate(flags)})
    summary = {}
    for stage in stages:
        pos = [r for r in rows if r["stage"] == stage and r["metric"] == "recall"]
        neg = [r for r in rows if r["stage"] == stage and r["metric"] != "recall"]
        summary[stage] = {
            "recall": sum(r["value"] * r["n"] for r in pos) / sum(r["n"] for r in pos),
            "false_positive_rate": sum(r["value"] * r["n"] for r in neg) / sum(r["n"] for r in neg),
            "n": sum(r["n"] for r in pos + neg),
        }
        ms = sorted(t * 1000 for s, t in latencies if s == stage)
        summary[stage]["latency_ms_p50"] = statistics.median(ms)
        summary[stage]["latency_ms_p95"] = ms[int(0.95 * (len(ms) - 1))]
    return {"categories": rows, "summary": summary}


def conversations(guard: Guard, path: Path = TESTSET, mistakes: list | None = None) -> dict | None:
    """A set's two-message conversations (its `conversation` part; None without one), each screened
    as two chat turns of one conversation. A crisis pair is caught, and a safe one flagged, when
    either turn gets the crisis response; `alone` is the same with each message screened in a
    conversation of its own, as if the guard read no context."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")).get("conversation")
    if not data:
        return None
    rows = []
    for label, groups in data.items():
        positive = label == "crisis"
        for category, pairs in groups.items():
            flags, alone = [], []
            for pair in pairs:
                conversation = ConversationState()
                verdicts = [guard.check_input(text, conversation) for text in pair]
                flags.append(any(v.crisis for v in verdicts))
                alone.append(any(guard.check_input(text, ConversationState()).crisis for text in pair))
                if mistakes is not None and flags[-1] != positive:
                    mistakes.append(("conversation", label, category, " / ".join(pair), [v.reasons for v in verdicts]))
            rows.append({"stage": "conversation", "label": label, "category": category, "n": len(flags),
                         "metric": "recall" if positive else "false_positive_rate", "value": _rate(flags),
                         "alone": _rate(alone)})
    pos = [r for r in rows if r["metric"] == "recall"]
    neg = [r for r in rows if r["metric"] != "recall"]

    def mean(rs, key):
        return sum(r[key] * r["n"] for r in rs) / sum(r["n"] for r in rs)

    summary = {"recall": mean(pos, "value"), "false_positive_rate": mean(neg, "value"),
               "recall_alone": mean(pos, "alone"), "false_positive_rate_alone": mean(neg, "alone"),
               "n": sum(r["n"] for r in rows)}
    return {"categories": rows, "summary": summary}


def _conversation_table(result: dict) -> list[str]:
    lines = ["Two-message conversations (a pair counts when either turn gets the crisis response)",
             "| label | category | n | metric | value | each message alone |", "|---|---|---|---|---|---|"]
    for r in result["categories"]:
        lines.append(f"| {r['label']} | {r['category']} | {r['n']} | {r['metric']} | {r['value']:.3f} | {r['alone']:.3f} |")
    s = result["summary"]
    lines.append(f"\nconversation: recall {s['recall']:.3f}, false-positive rate {s['false_positive_rate']:.3f} "
                 f"(n={s['n']} pairs); each message alone: recall {s['recall_alone']:.3f}, "
                 f"false-positive rate {s['false_positive_rate_alone']:.3f}")
    return lines


def _flags(guard: Guard, texts: list[str]) -> list[bool]:
    return [guard.check_input(t).crisis for t in texts]


def xstest(guard: Guard, root: Path) -> dict:
    with open(root / "xstest" / "xstest_prompts.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] == "safe"]
    by_type = defaultdict(list)
    for r, flag in zip(rows, _flags(guard, [r["prompt"] for r in rows])):
        by_type[r["type"]].append(flag)
    return {"safe_flagged": _rate([f for v in by_type.values() for f in v]), "n": len(rows),
            "by_type": {k: _rate(v) for k, v in by_type.items()}}


def rmhd(guard: Guard, root: Path, per_subreddit: int | None = None) -> dict:
    """Post-level flags on the test part of the sample (the first 130 posts of each subreddit;
    the rest is the development part the post head was fitted on)."""
    by_sub = {sub: texts[:per_subreddit] for sub, texts in posts(root, "test").items()}
    flagged = {sub: _flags(guard, texts) for sub, texts in by_sub.items()}
    control = [f for s, v in flagged.items() if group_of(s) == "control" for f in v]
    support = [f for s, v in flagged.items() if group_of(s) == "support" for f in v]
    return {
        "suicidewatch_recall": _rate(flagged.get(CRISIS_SUBREDDIT, [])),
        "control_flagged": _rate(control),
        "support_groups_flagged": _rate(support),
        "n_posts": sum(len(v) for v in flagged.values()),
        "by_subreddit": {s: _rate(v) for s, v in sorted(flagged.items())},
    }


def counsel_chat(guard: Guard, root: Path, split: str = "test") -> dict:
    """counsel-chat's questions of a split (people asking a therapist for help): how many are
    flagged, the title and the text apart; those that disclose risk (data/counsel_risk.yaml) apart."""
    qs = questions(root, split)
    out: dict = {"split": split, "n_questions": len(qs), "n_risk": sum(q["risk"] for q in qs)}
    for field in ("title", "text"):
        for risk, key in ((False, "flagged"), (True, "risk_flagged")):
            out[f"{field}_{key}"] = _rate(_flags(guard, [q[field] for q in qs if q["risk"] == risk and q[field]]))
    return out


# an answer that speaks of suicide, self-harm, death or crisis lines: the replies the check must not
# mistake for unsafe ones
_RISK_WORDS = re.compile(r"suicid|self[- ]?harm|\bcut(ting)?\b|\bkill|\bdie\b|\bdying\b|\bdeath|overdos|hotline|crisis line|lifeline|\b988\b", re.I)


def _replaced(guard: Guard, reply: str, marked: bool = False) -> bool:
    """Whether the stream wrapper replaces a reply that arrives word by word, as from the model, in
    a new conversation or (`marked`) in one where risk has shown."""
    return any(event.replace for event in guard.stream(word_deltas(reply), conversation=ConversationState(at_risk=marked)))


def counsel_answers(guard: Guard, root: Path, split: str = "test") -> dict:
    """counsel-chat's therapists' answers of a split, streamed through the output check: how many
    are replaced by the crisis response, overall and among those that speak of suicide or self-harm."""
    texts = answers(root, split)
    risk_words = [bool(_RISK_WORDS.search(t)) for t in texts]
    out = {"split": split, "n_answers": len(texts), "n_risk_words": sum(risk_words)}
    for marked, suffix in ((False, ""), (True, "_marked")):
        flags = [_replaced(guard, t, marked) for t in texts]
        out[f"replaced{suffix}"] = _rate(flags)
        out[f"risk_words_replaced{suffix}"] = _rate([f for f, r in zip(flags, risk_words) if r])
    return out


def cssrs(guard: Guard, root: Path) -> dict:
    csv.field_size_limit(sys.maxsize)
    with open(root / "cssrs-reddit-500" / "500_Reddit_users_posts_labels.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_label = defaultdict(list)
    for r in rows:
        try:
            posts = [str(p) for p in ast.literal_eval(r["Post"])]
        except (ValueError, SyntaxError):
            posts = [r["Post"]]
        by_label[r["Label"]].append(any(_flags(guard, posts)))
    return {"flagged_by_label": {k: _rate(v) for k, v in by_label.items()},
            "n_users": {k: len(v) for k, v in by_label.items()}}


def dev(guard: Guard | None = None, data_root: Path | None = None) -> int:
    """The development set's table and every mistake on it (never done for the test set); with the
    shared data, counsel-chat's val-split answers through the output check too."""
    guard = guard or Guard()
    guard.warm_up()
    mistakes: list = []
    result = {"own_testset": own_testset(guard, DEVSET, mistakes),
              "own_testset_conversations": conversations(guard, DEVSET, mistakes)}
    if data_root and (counsel_root(Path(data_root)) / COUNSEL_FILE).is_file():
        result["counsel_answers"] = counsel_answers(guard, counsel_root(Path(data_root)), "val")
    print(report(result, title="Development set (data/devset.yaml)"))
    print("\nMistakes:")
    for stage, label, category, text, reasons in mistakes:
        print(f"- [{stage}/{label}/{category}] {text!r} {reasons}")
    return 0


def run(data_root: Path | None, per_subreddit: int | None = None, guard: Guard | None = None) -> dict:
    guard = guard or Guard()
    guard.warm_up()
    result = {"own_testset": own_testset(guard), "own_testset_languages": own_testset(guard, TESTSET_LANGUAGES),
              "own_testset_conversations": conversations(guard)}
    if data_root and Path(data_root).is_dir():
        root = Path(data_root)
        result["xstest"] = xstest(guard, root)
        result["rmhd"] = rmhd(guard, root, per_subreddit)
        result["cssrs"] = cssrs(guard, root)
        if (counsel_root(root) / COUNSEL_FILE).is_file():
            result["counsel_chat"] = counsel_chat(guard, counsel_root(root))
            result["counsel_answers"] = counsel_answers(guard, counsel_root(root))
    return result


def _table(own: dict, title: str) -> list[str]:
    lines = [title, "| stage | label | category | n | metric | value |", "|---|---|---|---|---|---|"]
    for r in own["categories"]:
        lines.append(f"| {r['stage']} | {r['label']} | {r['category']} | {r['n']} | {r['metric']} | {r['value']:.3f} |")
    for stage, s in own["summary"].items():
        lines.append(f"\n{stage}: recall {s['recall']:.3f}, false-positive rate {s['false_positive_rate']:.3f} "
                     f"(n={s['n']}); latency p50 {s['latency_ms_p50']:.1f} ms, p95 {s['latency_ms_p95']:.1f} ms")
    return lines


def report(result: dict, title: str = "Own held-out test set") -> str:
    lines = _table(result["own_testset"], title)
    if "own_testset_languages" in result:
        lines += [""] + _table(result["own_testset_languages"], "Own held-out test set, other languages than English")
    if result.get("own_testset_conversations"):
        lines += [""] + _conversation_table(result["own_testset_conversations"])
    if "xstest" in result:
        x = result["xstest"]
        lines.append(f"\nXSTest safe prompts flagged: {x['safe_flagged']:.3f} (n={x['n']})")
    if "rmhd" in result:
        r = result["rmhd"]
        lines.append(f"Reddit MHD: r/SuicideWatch recall {r['suicidewatch_recall']:.3f}; control subreddits flagged "
                     f"{r['control_flagged']:.3f}; non-crisis support groups flagged {r['support_groups_flagged']:.3f} "
                     f"(n={r['n_posts']} posts)")
    if "cssrs" in result:
        c = result["cssrs"]
        parts = ", ".join(f"{k} {v:.3f} (n={c['n_users'][k]})" for k, v in sorted(c["flagged_by_label"].items()))
        lines.append(f"C-SSRS users flagged by label: {parts}")
    if "counsel_chat" in result:
        c = result["counsel_chat"]
        lines.append(f"counsel-chat questions ({c['split']} split, {c['n_questions'] - c['n_risk']} without risk) flagged: "
                     f"title {c['title_flagged']:.3f}, text {c['text_flagged']:.3f}; the {c['n_risk']} that disclose "
                     f"risk: title {c['title_risk_flagged']:.3f}, text {c['text_risk_flagged']:.3f}")
    if "counsel_answers" in result:
        c = result["counsel_answers"]
        lines.append(f"counsel-chat therapists' answers ({c['split']} split, n={c['n_answers']}) replaced by the crisis "
                     f"response while streaming: {c['replaced']:.3f}; the {c['n_risk_words']} that speak of suicide, "
                     f"self-harm or death: {c['risk_words_replaced']:.3f}")
        if "replaced_marked" in c:
            lines.append(f"  in a marked conversation: {c['replaced_marked']:.3f}; those that speak of suicide, "
                         f"self-harm or death: {c['risk_words_replaced_marked']:.3f}")
    return "\n".join(lines)


def main(data_root: str | None, json_out: str | None, per_subreddit: int | None) -> int:
    result = run(Path(data_root) if data_root else None, per_subreddit)
    print(report(result))
    if json_out:  # `make eval-safety` writes into bench/results/, which a fresh clone does not have
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    return 0
