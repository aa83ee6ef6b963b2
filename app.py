"""Mental-health support chat: Gradio UI with Chat and About views.

    python app.py [--host 127.0.0.1] [--port 7860] [--model smollm2-135m-instruct]
                  [--adapter PATH|HUB_ID|none] [--quantize auto|4bit|8bit|none] [--region US]

Every option can also come from an environment variable (CHATBOT_HOST, CHATBOT_PORT, ...), which
is how Hugging Face Spaces configures it. The model loads at start-up, never at import.
API for gradio_client: client.predict(message, api_name="/chat") -> reply;
client.predict(message, api_name="/compare") -> [base_reply, finetuned_reply].
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # privacy: no usage analytics by default

import gradio as gr  # noqa: E402 - after the analytics switch above

from chatbot.config import (BACKEND_CHOICES, DEFAULT_ADAPTER, DEFAULT_MODEL, PROJECT_ROOT, QUANTIZE_CHOICES, GenerationConfig,
                            Limits, ModelConfig)

log = logging.getLogger("app")

DISCLAIMER = (
    "**This is an AI, not a therapist or a crisis service.** It can listen and share general "
    "ideas, but it is not a substitute for professional care. Conversations are not stored."
)
EXAMPLES = [
    "I've been feeling really stressed about my exams.",
    "I feel lonely since I moved to a new city.",
    "How can I support a friend who seems down?",
    "I can't sleep because my mind keeps racing.",
]


def _env(name: str, default=None):
    return os.environ.get(f"CHATBOT_{name}", default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_adapter = str(DEFAULT_ADAPTER) if (DEFAULT_ADAPTER / "adapter_config.json").is_file() else "none"
    p = argparse.ArgumentParser(description="Mental-health support chatbot (Gradio).")
    p.add_argument("--host", default=_env("HOST", os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")),
                   help="address to bind (env CHATBOT_HOST); 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=int(_env("PORT", os.environ.get("GRADIO_SERVER_PORT", 7860))),
                   help="port (env CHATBOT_PORT)")
    p.add_argument("--model", default=_env("MODEL", DEFAULT_MODEL),
                   help=f"'{DEFAULT_MODEL}' (built in), a Hub id or a local folder (env CHATBOT_MODEL)")
    p.add_argument("--adapter", default=_env("ADAPTER", default_adapter),
                   help="LoRA adapter folder or Hub id, or 'none' (env CHATBOT_ADAPTER)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=_env("QUANTIZE", "auto"),
                   help="auto: 4-bit NF4 on CUDA, int8 weight-only on CPU; none: full precision (env CHATBOT_QUANTIZE)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=_env("BACKEND", "auto"),
                   help="chat decoding: auto (ONNX Runtime GenAI on a CPU with int8 weights, where installed), "
                        "onnx or torch (env CHATBOT_BACKEND)")
    p.add_argument("--merge", action="store_true", default=_env("MERGE", "0") in ("1", "true", "yes"),
                   help="merge the adapter into the weights: fastest, but no base-model comparison (env CHATBOT_MERGE)")
    p.add_argument("--region", default=_env("REGION", "INTL"),
                   help="crisis resources region, e.g. US, GB, IN; INTL for the international directory (env CHATBOT_REGION)")
    p.add_argument("--max-new-tokens", type=int, default=int(_env("MAX_NEW_TOKENS", 256)), help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=float(_env("TEMPERATURE", 0.7)),
                   help="sampling temperature; 0 for greedy, reproducible replies (env CHATBOT_TEMPERATURE)")
    p.add_argument("--queue-size", type=int, default=Limits().queue_size, help="requests waiting before 'busy' (env QUEUE_MAX_SIZE)")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "WARNING"), help="message text is never logged at any level")
    p.add_argument("--auth", default=_env("AUTH"), metavar="USER:PASSWORD[,USER:PASSWORD]",
                   help="require a login (env CHATBOT_AUTH; prefer the variable, which stays out of shell history)")
    p.add_argument("--rate-limit", type=int, default=int(_env("RATE_LIMIT", 12)),
                   help="messages per minute per session; 0 turns the limit off (env CHATBOT_RATE_LIMIT)")
    return p.parse_args(argv)


def parse_auth(spec: str | None) -> list[tuple[str, str]] | None:
    """'alice:pw1,bob:pw2' -> [('alice', 'pw1'), ('bob', 'pw2')]; None when no login is wanted."""
    if not spec:
        return None
    pairs = []
    for item in spec.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError("--auth wants USER:PASSWORD pairs separated by commas")
        pairs.append((user, password))
    return pairs


class RateLimiter:
    """At most `per_minute` messages per session in any 60 s window (0 = no limit)."""

    def __init__(self, per_minute: int, clock=None):
        import time

        self.per_minute = per_minute
        self.clock = clock or time.monotonic
        self._sent: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def wait_time(self, session: str | None) -> float:
        """0 if this message may go now (and count it), else seconds until it may."""
        if self.per_minute <= 0:
            return 0.0
        now = self.clock()
        with self._lock:
            recent = [t for t in self._sent.get(session or "", []) if now - t < 60]
            if len(recent) >= self.per_minute:
                self._sent[session or ""] = recent
                return 60 - (now - recent[0])
            recent.append(now)
            self._sent[session or ""] = recent
            return 0.0


RATE_LIMITED = ("You're sending messages faster than I can keep up with. Please wait {s} seconds and send "
                "it again; your message is still in the box and nothing was lost.")


class StopEvents:
    """One stop event per browser session, so the Stop button halts that session's generation."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def new(self, session: str | None) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events[session or ""] = event
        return event

    def stop(self, session: str | None) -> None:
        with self._lock:
            event = self._events.pop(session or "", None)
        if event:
            event.set()


class AdapterChoices:
    """The adapters a user can pick: those loaded, plus folders in adapters/ loaded on first use."""

    def __init__(self, service, folder=PROJECT_ROOT / "adapters", extra: list[str] | None = None):
        from chatbot.loading import adapter_name, list_adapters

        self.service = service
        self.sources = {adapter_name(str(p)): str(p) for p in list_adapters(folder)}
        for spec in extra or []:
            self.sources.setdefault(adapter_name(spec), spec)

    def choices(self) -> list[tuple[str, str]]:
        engine = self.service.engine
        if engine.merged:
            return [("Model with the adapter merged in", "base")]  # merge_and_unload leaves no adapter names
        names = [n for n in engine.adapters if n != "base"]
        names += [n for n in self.sources if n not in names]
        return [("Base model (no adapter)", "base")] + [(n, n) for n in names]

    def select(self, name: str) -> str:
        """Make `name` usable (loading it if needed); AdapterError if it cannot be."""
        if name == "base" or name in self.service.engine.adapters:
            return name
        if name not in self.sources:
            from chatbot.loading import AdapterError

            raise AdapterError(f"Unknown adapter {name!r}.")
        return self.service.engine.add_adapter(self.sources[name])


def _status_line(status: str) -> str:
    return {
        "streaming": "⏳ writing… (shown sentence by sentence after the safety check)",
        "passed": "✅ passed the safety check",
        "withheld": "🛑 withheld by the safety check: crisis resources shown instead",
        "error": "⚠️ generation failed",
    }[status]


def build_demo(service, regions: list[tuple[str, str]], default_region: str = "INTL", title: str = "Support chat",
               adapters: AdapterChoices | None = None, rate_limit: int = 0):
    """The Gradio app around a ChatService. No model is loaded here."""
    from chatbot.compare import compare
    from chatbot.loading import AdapterError
    from safety import ConversationState

    stops = StopEvents()
    limiter = RateLimiter(rate_limit)
    guard = service.guard
    adapters = adapters or AdapterChoices(service, folder=None)

    def limited(message, request) -> str | None:
        """The 'slow down' text if this session is over its limit and the message is not a crisis."""
        wait = limiter.wait_time(getattr(request, "session_hash", None))
        if not wait:
            return None
        if guard.check_input(str(message or "")).crisis:
            return None  # someone at risk always gets the crisis response, limit or not
        return RATE_LIMITED.format(s=max(1, round(wait)))
    default_adapter = service.default_adapter() or "base"

    def banner(region):
        return f"🆘 {guard.resources_line(region)}"

    def submit(message, history, conversation, region, adapter, request: gr.Request):
        history = list(history or [])
        if notice := limited(message, request):
            gr.Warning(notice)
            yield history, message, conversation, banner(region)
            return
        stop = stops.new(getattr(request, "session_hash", None))
        history = history + [{"role": "user", "content": message or ""}, {"role": "assistant", "content": "…"}]
        yield history, "", conversation, banner(region)
        for text in service.respond(message, history[:-2], conversation, region, adapter=adapter, stop=stop):
            history[-1] = {"role": "assistant", "content": text}
            yield history, "", conversation, banner(region)

    def stop_generation(request: gr.Request):
        stops.stop(getattr(request, "session_hash", None))

    def pick_adapter(name, current):
        try:
            return adapters.select(name), gr.update(choices=adapters.choices())
        except AdapterError as exc:
            gr.Warning(str(exc))
            return current, gr.update(value=current, choices=adapters.choices())

    def run_compare(message, region, adapter, request: gr.Request):
        if notice := limited(message, request):
            yield notice, "", "", "", gr.update(visible=False)
            return
        stop = stops.new(getattr(request, "session_hash", None))
        target = adapter if adapter != "base" else None
        try:
            for state in compare(service, message, region, adapter=target, stop=stop):
                if state["crisis"]:
                    yield state["base"], "", "", "", gr.update(visible=False)
                    return
                yield ("", state["base"], _status_line(state["status"][0]), state["finetuned"],
                       gr.update(visible=True, value=_status_line(state["status"][1])))
        except ValueError as exc:
            yield str(exc), "", "", "", gr.update(visible=False)

    def chat_api(message: str, request: gr.Request) -> str:
        """One-turn chat: the assistant's screened reply to `message`."""
        if notice := limited(message, request):
            return notice
        return service.reply(message, conversation=ConversationState(), region=default_region)

    def compare_api(message: str, request: gr.Request) -> list[str]:
        """The base model's and the fine-tuned model's screened replies to `message`."""
        if notice := limited(message, request):
            return [notice, notice]
        final = None
        try:
            for final in compare(service, message, default_region):
                pass
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return [final["base"], final["finetuned"]]

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n{DISCLAIMER}")
        resources = gr.Markdown(banner(default_region), elem_id="crisis-resources")
        region = gr.Dropdown(choices=regions, value=default_region, label="Your region (for crisis resources)")
        adapter = gr.Dropdown(choices=adapters.choices(), value=default_adapter, label="Model",
                              elem_id="adapter", interactive=not service.engine.merged)
        adapter_state = gr.State(default_adapter)
        with gr.Tab("Chat"):
            conversation = gr.State(ConversationState())
            chatbot = gr.Chatbot(label="Conversation", height=480, elem_id="chat", sanitize_html=True,
                                 render_markdown=True, buttons=["copy"])
            with gr.Row():
                box = gr.Textbox(placeholder="Write how you're feeling…", show_label=False, scale=8,
                                 elem_id="message", max_lines=8)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                stop = gr.Button("Stop", scale=1, elem_id="stop")
            gr.Examples(EXAMPLES, inputs=box, label="Try")
            clear = gr.Button("New conversation", size="sm")
        with gr.Tab("Compare"):
            gr.Markdown("One message, two answers: the base model and the fine-tuned model (the Model "
                        "selector above), same settings and seed. Each answer passes the safety check.")
            with gr.Row():
                cmp_box = gr.Textbox(placeholder="A message for both models…", show_label=False, scale=8,
                                     elem_id="compare-message", max_lines=8)
                cmp_send = gr.Button("Compare", variant="primary", scale=1, elem_id="compare-send")
            cmp_notice = gr.Markdown(elem_id="compare-notice")
            with gr.Row():
                with gr.Column():
                    gr.Markdown("### Base model")
                    cmp_base = gr.Markdown(elem_id="compare-base", sanitize_html=True)
                    cmp_base_status = gr.Markdown(elem_id="compare-base-status")
                with gr.Column():
                    gr.Markdown("### Fine-tuned")
                    cmp_tuned = gr.Markdown(elem_id="compare-finetuned", sanitize_html=True)
                    cmp_tuned_status = gr.Markdown(elem_id="compare-finetuned-status")
        with gr.Tab("About"):
            gr.Markdown(about_text(service))

        inputs = [box, chatbot, conversation, region, adapter_state]
        outputs = [chatbot, box, conversation, resources]
        events = [
            box.submit(submit, inputs, outputs, api_visibility="private", concurrency_limit=None),
            send.click(submit, inputs, outputs, api_visibility="private", concurrency_limit=None),
        ]
        cmp_outputs = [cmp_notice, cmp_base, cmp_base_status, cmp_tuned, cmp_tuned_status]
        cmp_inputs = [cmp_box, region, adapter_state]
        events += [
            cmp_send.click(run_compare, cmp_inputs, cmp_outputs, api_visibility="private", concurrency_limit=None),
            cmp_box.submit(run_compare, cmp_inputs, cmp_outputs, api_visibility="private", concurrency_limit=None),
        ]
        stop.click(stop_generation, None, None, cancels=events, queue=False, api_visibility="private")
        region.change(banner, region, resources, queue=False, api_visibility="private")
        adapter.change(pick_adapter, [adapter, adapter_state], [adapter_state, adapter], api_visibility="private")
        clear.click(lambda: ([], ConversationState()), None, [chatbot, conversation], queue=False,
                    api_visibility="private")
        gr.api(chat_api, api_name="chat")
        gr.api(compare_api, api_name="compare")
    return demo


def about_text(service) -> str:
    from chatbot.loading import weights_format

    model = service.engine.model
    adapters = [a for a in service.engine.adapters if a != "base"]
    return "\n".join([
        "## About",
        f"- Model: `{getattr(model.config, 'name_or_path', '?')}`; adapter: {', '.join(adapters) or 'none'}; "
        f"weights: {weights_format(model)}; chat decoding: "
        f"{'ONNX Runtime GenAI (int8)' if service.engine.onnx is not None else 'torch'}.",
        "- Every message is screened before it reaches the model, and every reply is screened sentence "
        "by sentence before you see it. If something suggests you may be at risk, you get crisis resources.",
        "- Conversations are not written to disk or logs.",
        "- This assistant is an AI. It is not a therapist, doctor or crisis service.",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from chatbot.generation import ChatEngine
    from chatbot.loading import AdapterError, ModelLoadError, load_model, load_onnx
    from chatbot.service import ChatService
    from safety import Guard, SafetyConfig
    from safety.hotlines import directory

    try:
        auth = parse_auth(args.auth)
        cfg = ModelConfig(model=args.model, adapter=args.adapter, quantize=args.quantize, merge=args.merge,
                          backend=args.backend)
        guard = Guard(SafetyConfig(region=args.region))  # no heads, no app (classifier.HeadsError)
        model, tokenizer = load_model(cfg)
        onnx = load_onnx(cfg)
    except (ModelLoadError, AdapterError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # after the model, not beside it: both import peft (sentence-transformers does), and two
    # threads importing one package can meet it half-initialised (a CI run failed so)
    guard.warm_up()
    limits = Limits(queue_size=args.queue_size)
    engine = ChatEngine(model, tokenizer, limits.max_input_tokens, merged=bool(cfg.merge and cfg.adapter), onnx=onnx)
    service = ChatService(engine, guard, GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature), limits)
    choices = AdapterChoices(service, extra=[cfg.adapter] if cfg.adapter else [])
    demo = build_demo(service, [(label, code) for label, code in directory().choices()], args.region, adapters=choices,
                      rate_limit=args.rate_limit)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=1)
    threading.Thread(target=service.warm_up, name="warm-up", daemon=True).start()
    demo.launch(server_name=args.host, server_port=args.port, show_error=False, auth=auth)
    return 0


if __name__ == "__main__":
    sys.exit(main())
