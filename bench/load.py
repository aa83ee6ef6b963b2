"""Load test: many concurrent sessions against the running app on 127.0.0.1, via gradio_client.

    python -m bench.load [--sessions 16] [--requests 200] [--queue-size 32] [--max-new-tokens 16]
    (or: make load)

The app runs as its own process (`python app.py`, greedy decoding, rate limit off), so the memory
figures are the server's alone. Each message has one correct reply under greedy decoding; the
replies are taken once, one at a time, before the load starts, and a reply that differs under
load would be another session's. Every request either completes or gets the queue's "busy" error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [
    "I've been feeling stressed about my exams.",
    "I feel lonely since I moved to a new city.",
    "How can I support a friend who seems down?",
    "I can't sleep because my mind keeps racing.",
    "I want to kill myself",  # the crisis path is part of the load too
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--requests", type=int, default=200, help="total requests over all sessions (at least)")
    p.add_argument("--queue-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", default="bench/results/load.json")
    args = p.parse_args()
    from gradio_client import Client

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port), "--temperature", "0", "--rate-limit", "0",
         "--max-new-tokens", str(args.max_new_tokens), "--queue-size", str(args.queue_size)],
        cwd=ROOT, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline, client = time.time() + 300, None
        while client is None and time.time() < deadline:
            try:
                client = Client(url, verbose=False)
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        if client is None:
            print("error: the app did not start", file=sys.stderr)
            return 2
        expected = {m: client.predict(m, api_name="/chat") for m in MESSAGES}
        rss_ready = rss_mb(server.pid)

        per_session = math.ceil(args.requests / args.sessions)
        latencies, memory, errors = [], [], []
        wrong = busy = 0
        lock = threading.Lock()

        def session(k: int):
            nonlocal wrong, busy
            c = Client(url, verbose=False)
            for turn in range(per_session):
                message = MESSAGES[(k + turn) % len(MESSAGES)]
                t = time.perf_counter()
                try:
                    reply = c.predict(message, api_name="/chat")
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
                    memory.append(rss_mb(server.pid))

        started = time.perf_counter()
        threads = [threading.Thread(target=session, args=(k,)) for k in range(args.sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=60)

    lat = sorted(latencies)
    tenth = max(1, len(memory) // 10)
    result = {
        "sessions": args.sessions, "requests": args.sessions * per_session, "completed": len(lat), "busy": busy,
        "errors": len(errors), "error_types": sorted(set(errors)), "wrong_session_replies": wrong,
        "throughput_rps": len(lat) / elapsed, "p50_s": statistics.median(lat) if lat else None,
        "p95_s": lat[int(0.95 * (len(lat) - 1))] if lat else None, "max_new_tokens": args.max_new_tokens,
        "server_rss_ready_mb": rss_ready,
        "server_rss_first_tenth_mb": statistics.mean(memory[:tenth]) if memory else None,
        "server_rss_last_tenth_mb": statistics.mean(memory[-tenth:]) if memory else None,
        "server_rss_peak_mb": max(memory) if memory else None,
    }
    print(json.dumps(result, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not errors and not wrong else 1


if __name__ == "__main__":
    raise SystemExit(main())
