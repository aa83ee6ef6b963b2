"""The system prompt and turning a conversation into model input that fits the context."""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are a warm, supportive listener in a mental-health support chat. You are an AI, not a "
    "therapist or doctor, and you say so if asked. Listen first: reflect what the person feels, "
    "validate it, and ask gentle open questions. Use plain, kind, non-clinical language and keep "
    "replies short. Offer simple coping ideas only when they fit, and encourage reaching out to "
    "trusted people or a professional. Never give medical dosages or describe ways to self-harm. "
    "If someone may be in danger, urge them to contact local emergency services or a crisis line."
)


def build_messages(history: list[dict], message: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict]:
    """System prompt, earlier turns (role/content dicts), then the new user message."""
    turns = [{"role": m["role"], "content": m["content"]} for m in history if m.get("role") in ("user", "assistant")]
    return [{"role": "system", "content": system_prompt}, *turns, {"role": "user", "content": message}]


def encode(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, enable_thinking=False, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def fit_to_context(tokenizer, messages: list[dict], max_tokens: int) -> tuple[list[int], int]:
    """Token ids of the prompt, dropping the oldest turns until it fits in max_tokens.

    Returns (ids, number of earlier messages dropped). The system prompt and the newest user
    message are always kept; if they alone are too long the user message is cut at the end.
    """
    system, *turns = messages
    dropped = 0
    while True:
        ids = encode(tokenizer, [system, *turns])
        if len(ids) <= max_tokens or len(turns) <= 1:
            break
        # drop the oldest message; keep the conversation starting with a user turn
        turns = turns[1:]
        dropped += 1
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
            dropped += 1
    if len(ids) > max_tokens:
        last = turns[-1]
        budget = max_tokens - (len(ids) - len(tokenizer(last["content"], add_special_tokens=False).input_ids))
        cut = tokenizer(last["content"], add_special_tokens=False).input_ids[: max(budget - 8, 1)]
        turns[-1] = {"role": "user", "content": tokenizer.decode(cut)}
        ids = encode(tokenizer, [system, *turns])
    return ids, dropped
