"""The model's own replies through the output check: how often a reply to an ordinary message is
replaced by the crisis response (a false block the user would see).

    python -m chatbot.own_replies [--set dev|test] [--limit N] [--json out.json] [--show]

The app's chat path answers each English safe message of the project's dev or test set
(safety/data/devset.yaml or testset.yaml) and counsel-chat's questions of the matching split
without risk (val for dev, test for test; from ../shared/data). Each message is screened first,
as in the app; one the input check stops is counted, not answered. Each reply is sampled at the
app's settings with the message's index as seed, and its deltas, as the engine streamed them, go
through the stream wrapper twice: in a new conversation, and in one where risk has shown
(marked). A reply shown whole that gives a crisis line's number the hotline directory does not
hold is counted too: the chat shows the checked lines beneath it (safety/numbers.py). `--show`
prints each replaced reply (dev set only: the test set is for the record). Replies are not
written anywhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import yaml

from .config import DEFAULT_ADAPTER, GenerationConfig, ModelConfig
from .generation import BASE
from .prompts import build_messages
from .service import ChatService, number_note

SAFETY_DATA = Path(__file__).resolve().parent.parent / "safety" / "data"
SETS = {"dev": (SAFETY_DATA / "devset.yaml", "val"), "test": (SAFETY_DATA / "testset.yaml", "test")}
ENGLISH_SKIP = ("language", "unlisted_language", "everyday_language", "everyday_unlisted")
DEFAULT_EVAL_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "eval"


def messages_of(which: str, data_root: Path | None) -> dict[str, list[str]]:
    """Safe English messages by category, and counsel-chat's questions without risk."""
    path, split = SETS[which]
    safe = yaml.safe_load(path.read_text(encoding="utf-8"))["input"]["safe"]
    out = {cat: list(texts) for cat, texts in safe.items() if cat not in ENGLISH_SKIP}
    if data_root is not None:
        from safety.counsel import COUNSEL_FILE, counsel_root, questions

        root = counsel_root(Path(data_root))
        if (root / COUNSEL_FILE).is_file():
            out[f"counsel_{split}"] = [q["text"] or q["title"] for q in questions(root, split) if not q["risk"]]
    return out


def screen(service, text: str, seed: int, gen: GenerationConfig) -> dict:
    """One message through the app's chat path; the reply read in a new and in a marked conversation."""
    from safety.guard import ConversationState

    if service.guard.check_input(text, ConversationState()).crisis:
        return {"stopped_at_input": True}
    adapter = service.default_adapter() or BASE
    deltas = list(service.engine.stream(build_messages([], text), dataclasses.replace(gen, seed=seed), adapter=adapter))
    reply = "".join(deltas)
    out = {"stopped_at_input": False, "chars": len(reply), "reply": reply,
           "unverified_numbers": bool(number_note(service.guard, reply, None))}  # the note the chat shows
    for key, marked in (("new", False), ("marked", True)):
        shown, replaced = "", None
        for event in service.guard.stream(iter(deltas), conversation=ConversationState(at_risk=marked)):
            if event.replace is not None:
                replaced = event.verdict.reasons if event.verdict else []
                break
            shown += event.text
        out[key] = {"replaced": replaced is not None, "shown_chars": len(shown), "reasons": replaced or []}
    return out


def run(service, groups: dict[str, list[str]], gen: GenerationConfig, limit: int | None = None, show: bool = False) -> dict:
    rows, started, seed = [], time.perf_counter(), 0
    for category, texts in groups.items():
        results = []
        for text in texts[:limit]:
            r = screen(service, text, seed, gen)
            seed += 1
            results.append(r)
            if show and not r["stopped_at_input"] and (r["new"]["replaced"] or r["marked"]["replaced"]):
                where = "new and marked" if r["new"]["replaced"] else "marked only"
                shown = r["marked"]["shown_chars"]
                print(f"- [{category}] replaced ({where}) after {shown} of {r['chars']} characters "
                      f"{r['marked']['reasons']}\n  message: {text!r}\n  blocked from: {r['reply'][shown:shown + 240]!r}"
                      f"\n  reply: {r['reply']!r}", file=sys.stderr)
        answered = [r for r in results if not r["stopped_at_input"]]
        rows.append({"category": category, "n": len(results), "stopped_at_input": len(results) - len(answered),
                     "answered": len(answered), "replaced": sum(r["new"]["replaced"] for r in answered),
                     "replaced_marked": sum(r["marked"]["replaced"] for r in answered),
                     "number_note": sum(r["unverified_numbers"] and not r["new"]["replaced"] for r in answered),
                     "mean_chars": sum(r["chars"] for r in answered) / max(len(answered), 1)})
    total = {k: sum(r[k] for r in rows) for k in ("n", "stopped_at_input", "answered", "replaced", "replaced_marked",
                                                  "number_note")}
    return {"categories": rows, "total": total, "seconds": time.perf_counter() - started}


def report(result: dict, title: str) -> str:
    lines = [title, "| category | messages | stopped at input | answered | replaced (new) | replaced (marked) "
                    "| shown with the number note | mean reply chars |", "|---|---|---|---|---|---|---|---|"]
    for r in result["categories"]:
        lines.append(f"| {r['category']} | {r['n']} | {r['stopped_at_input']} | {r['answered']} | {r['replaced']} | "
                     f"{r['replaced_marked']} | {r['number_note']} | {r['mean_chars']:.0f} |")
    t = result["total"]
    lines.append(f"\nreplies replaced by the crisis response: {t['replaced']} of {t['answered']} in a new conversation, "
                 f"{t['replaced_marked']} of {t['answered']} in a marked one ({t['stopped_at_input']} of {t['n']} "
                 f"messages stopped at input; {result['seconds']:.0f} s); shown with the note on an unchecked "
                 f"crisis-line number (new conversation): {t['number_note']}")
    return "\n".join(lines)


def build_service(adapter: str | None):
    """The app's default chat path: the base model with the adapter, decoding on ONNX where it can."""
    from safety.guard import Guard

    from .generation import ChatEngine
    from .loading import load_model, load_onnx

    cfg = ModelConfig(adapter=adapter)
    model, tokenizer = load_model(cfg)
    guard = Guard()
    guard.warm_up()
    return ChatService(ChatEngine(model, tokenizer, onnx=load_onnx(cfg)), guard)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chatbot.own_replies", description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=tuple(SETS), default="dev", help="the project's dev or test set")
    p.add_argument("--data", default=str(DEFAULT_EVAL_DATA), help="folder of the public sets, for counsel-chat ('' to skip)")
    p.add_argument("--adapter", default=str(DEFAULT_ADAPTER), help="adapter folder, or 'none' for the base model")
    p.add_argument("--limit", type=int, help="first N messages of each category (quicker)")
    p.add_argument("--max-new-tokens", type=int, default=GenerationConfig().max_new_tokens)
    p.add_argument("--json", help="also write the figures (no text) here")
    p.add_argument("--show", action="store_true", help="print each replaced reply (dev set only)")
    args = p.parse_args(argv)
    if args.show and args.set != "dev":
        p.error("--show lists replies of the dev set only")
    service = build_service(args.adapter)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    result = run(service, messages_of(args.set, Path(args.data) if args.data else None), gen, args.limit, args.show)
    result.update({"set": args.set, "adapter": args.adapter, "max_new_tokens": args.max_new_tokens,
                   "temperature": gen.temperature, "top_p": gen.top_p})
    print(report(result, f"The model's own replies to the {args.set} set's safe messages ({args.adapter})"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
