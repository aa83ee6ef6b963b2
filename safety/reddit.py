"""The Reddit Mental Health Dataset sample, split once into a development and a test part.

Each subreddit's first TEST_POSTS posts (file order) are the test part that `python -m safety
evaluate` reports; the rest are the development part that `python -m safety fit` learns the
long-post head and its threshold from. No post is in both.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

RMHD_FILE = Path("rmhd-27-subreddits") / "rmhd_27subreddits_posts.csv"
TEST_POSTS = 130  # of 260 a subreddit
CRISIS_SUBREDDIT = "suicidewatch"
CONTROL_SUBREDDITS = {"conspiracy", "divorce", "guns", "legaladvice", "mindfulness", "personalfinance",
                      "teaching", "UKPersonalFinance", "ukpolitics", "unitedkingdom"}


def group_of(subreddit: str) -> str:
    if subreddit == CRISIS_SUBREDDIT:
        return "crisis"
    return "control" if subreddit in CONTROL_SUBREDDITS else "support"


def posts(root: Path, part: str) -> dict[str, list[str]]:
    """{subreddit: posts} of the 'test' or 'dev' part."""
    if part not in ("test", "dev"):
        raise ValueError("part must be 'test' or 'dev'")
    csv.field_size_limit(sys.maxsize)
    by_sub: dict[str, list[str]] = defaultdict(list)
    with open(Path(root) / RMHD_FILE, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_sub[row["subreddit"]].append(row["post"])
    cut = slice(0, TEST_POSTS) if part == "test" else slice(TEST_POSTS, None)
    return {sub: texts[cut] for sub, texts in by_sub.items()}
