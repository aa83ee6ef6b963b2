"""Safety CLI.

    python -m safety classify --stage input|output   < lines of {"text": ...}
    python -m safety evaluate [--data ../shared/data/eval] [--json results.json]
    python -m safety evaluate --dev        # the development set, mistakes listed
    python -m safety fit
    python -m safety hotlines [--stale-days 365]

`classify` writes one JSON line per input line, in order: {"crisis", "score", "reasons"}. A line
that is not valid JSON with a string "text" fails closed (crisis true, reason error:bad-input).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_EVAL_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "eval"


def classify(stage: str, stdin=sys.stdin, stdout=sys.stdout) -> int:
    from .guard import Guard

    guard = Guard()
    guard.warm_up()
    for line in stdin:
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
            if not isinstance(text, str):
                raise TypeError("text must be a string")
        except (ValueError, KeyError, TypeError):
            out = {"crisis": True, "score": 1.0, "reasons": ["error:bad-input"]}
        else:
            verdict = guard.check_input(text) if stage == "input" else guard.check_output(text)
            out = verdict.to_json()
        stdout.write(json.dumps(out) + "\n")
        stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safety", description="Crisis screening tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("classify", help="screen JSON lines from stdin")
    p.add_argument("--stage", choices=("input", "output"), required=True)
    p = sub.add_parser("evaluate", help="recall, false positives and latency per category")
    p.add_argument("--data", default=str(DEFAULT_EVAL_DATA), help="folder of the public evaluation sets ('' to skip)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--per-subreddit", type=int, help="cap posts per subreddit (quicker, less precise)")
    p.add_argument("--dev", action="store_true", help="the development set instead, with its mistakes listed")
    p = sub.add_parser("fit", help="refit the classifier heads (examples.yaml; the post head on the RMHD dev part)")
    p.add_argument("--data", default=str(DEFAULT_EVAL_DATA), help="folder of the public sets, for the post head")
    p.add_argument("--embedder", help="sentence-transformers model id or folder (default: the one the heads file records)")
    p.add_argument("--out", help="heads file to write (default: safety/data/heads.json; the guard reads SAFETY_HEADS)")
    p = sub.add_parser("hotlines", help="list regions; flag entries not verified recently")
    p.add_argument("--stale-days", type=int, default=365)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .classifier import HeadsError

    try:
        return _run(args)
    except HeadsError as exc:  # nothing is screened without the classifier: say why and stop
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "classify":
        return classify(args.stage)
    if args.command == "evaluate":
        from .evaluate import dev, main as evaluate

        return dev(data_root=args.data or None) if args.dev else evaluate(args.data or None, args.json, args.per_subreddit)
    if args.command == "fit":
        from .classifier import heads_file, recorded_embedder
        from .fit import fit

        out = Path(args.out) if args.out else heads_file()
        embedder = args.embedder or recorded_embedder(out)
        print(json.dumps(fit(out=out, embedder=embedder, data_root=Path(args.data) if args.data else None), indent=2))
        return 0
    from .hotlines import directory

    book = directory()
    for label, code in book.choices()[1:]:
        print(f"{code}\t{label}\t{len(book.get(code).services)} services")
    stale = book.stale(args.stale_days)
    for line in stale:
        print(f"STALE (> {args.stale_days} days): {line}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
