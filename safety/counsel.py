"""counsel-chat's questions (people asking a therapist for help): ordinary troubles, written the way
users of a support chatbot write. The train split teaches the classifier heads what is *not* a
crisis; the val split is for development and the test split is reported by `python -m safety
evaluate`. Questions that disclose risk (data/counsel_risk.yaml, read by hand) are kept apart.
The therapists' answers are supportive replies for the output check (round 22), split the same way.
"""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

COUNSEL_FILE = Path("counsel-chat") / "20200325_counsel_chat.csv"
RISK_FILE = Path(__file__).parent / "data" / "counsel_risk.yaml"


def counsel_root(eval_root: Path) -> Path:
    """The shared data folder holding counsel-chat, from the evaluation sets' folder beside it."""
    return Path(eval_root).parent


def questions(root: Path, split: str) -> list[dict]:
    """One row per question of a split: id, title, text and risk (from counsel_risk.yaml)."""
    risk = set(yaml.safe_load(RISK_FILE.read_text(encoding="utf-8"))[split])
    seen, out = set(), []
    with open(Path(root) / COUNSEL_FILE, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            qid = int(row["questionID"])
            if row["split"] != split or qid in seen:
                continue
            seen.add(qid)
            out.append({"id": qid, "title": row["questionTitle"].strip(), "text": row["questionText"].strip(),
                        "risk": qid in risk})
    return out


def safe_messages(root: Path, split: str = "train") -> list[str]:
    """The split's questions without risk, as messages: each title, and each text."""
    return [t for q in questions(root, split) if not q["risk"] for t in (q["title"], q["text"]) if t]


def answers(root: Path, split: str) -> list[str]:
    """The therapists' answers of a split, one per row: replies the output check must let through."""
    with open(Path(root) / COUNSEL_FILE, newline="", encoding="utf-8") as f:
        return [row["answerText"].strip() for row in csv.DictReader(f)
                if row["split"] == split and (row.get("answerText") or "").strip()]
