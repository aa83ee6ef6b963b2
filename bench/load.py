"""Load test: many concurrent sessions against the app on 127.0.0.1, through gradio_client.

    python -m bench.load [--sessions 16] [--requests 200] [--queue-size 32] [--max-new-tokens 16]
    (or: make load)

The app runs in this process on a free local port with greedy decoding, so each message has one
correct reply: a reply that differs from the one computed beforehand for that message would be
another session's. Every request either completes or gets the queue's "busy" error. Memory is the
resident size of this process (the server), sampled as requests complete.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import threading
import time
from pathlib import Path

MESSAGES = [
    "I've been feeling stressed about my exams.",
    "I feel lonely since I moved to a new city.",
    "How can I support a friend who seems down?",
    "I can't sleep because my mind keeps racing.",
    "I want to kill myself",  # the crisis path is part of the load too
]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--requests", type=int, default=200, help="total requests over all sessions")
    p.add_argument("--queue-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", default="bench/results/load.json")
    args = p.parse_args()

    import app
    from chatbot.config import DEFAULT_ADAPTER, GenerationConfig, ModelConfig
    from chatbot.generation import ChatEngine
    from chatbot.loading import load_model
    from chatbot.service import ChatService
    from gradio_client import Client
    from safety import ConversationState, Guard

    adapter = str(DEFAULT_ADAPTER) if (DEFAULT_ADAPTER / "adapter_config.json").is_file() else None
    model, tok = load_model(ModelConfig(adapter=adapter))
    guard = Guard()
    guard.warm_up()
    service = ChatService(ChatEngine(model, tok), guard, GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0))
    expected = {m: service.reply(m, conversation=ConversationState(), region="INTL") for m in MESSAGES}
    demo = app.build_demo(service, [("International", "INTL")], "INTL")
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)

    per_session = max(1, args.requests // args.sessions)
    latencies, wrong, busy, errors, memory = [], 0, 0, [], []
    lock = threading.Lock()
    start_rss = rss_mb()

    def session(k: int):
        nonlocal wrong, busy
        client = Client(url, verbose=False)
        for turn in range(per_session):
            message = MESSAGES[(k + turn) % len(MESSAGES)]
            t = time.perf_counter()
            try:
                reply = client.predict(message, api_name="/chat")
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    if "queue" in str(exc).lower() or "busy" in str(exc).lower():
                        busy += 1
                    else:
                        errors.append(type(exc).__name__)
                continue
            with lock:
                latencies.append(time.perf_counter() - t)
                wrong += reply != expected[message]
                memory.append(rss_mb())

    started = time.perf_counter()
    threads = [threading.Thread(target=session, args=(k,)) for k in range(args.sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    demo.close()

    lat = sorted(latencies)
    tenth = max(1, len(memory) // 10)
    result = {
        "sessions": args.sessions, "requests": args.sessions * per_session, "completed": len(lat), "busy": busy,
        "errors": len(errors), "error_types": sorted(set(errors)), "wrong_session_replies": wrong,
        "throughput_rps": len(lat) / elapsed, "p50_s": statistics.median(lat) if lat else None,
        "p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None, "max_new_tokens": args.max_new_tokens,
        "rss_start_mb": start_rss, "rss_first_tenth_mb": statistics.mean(memory[:tenth]) if memory else None,
        "rss_last_tenth_mb": statistics.mean(memory[-tenth:]) if memory else None, "adapter": adapter,
    }
    print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not errors and not wrong else 1


if __name__ == "__main__":
    raise SystemExit(main())
