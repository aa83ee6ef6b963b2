"""Crisis screening outside the model: normalisation, lexicon, embedding classifier, guard."""

from .guard import ConversationState, Guard, SafetyConfig, StreamEvent, Verdict

__all__ = ["ConversationState", "Guard", "SafetyConfig", "StreamEvent", "Verdict"]
