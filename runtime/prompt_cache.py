"""Keep one conversation's KV cache between `Engine.generate` calls (the single-caller path; the
Scheduler keeps conversations in its slots instead)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .errors import Gpt2OnnxError


@dataclass
class PromptCache:
    """Keeps the KV cache of one batch-1 generation for the next request on the same conversation.

    A request whose prompt extends the tokens the cache already holds (the previous prompt and its
    reply) runs only the new tokens through the model; any other prompt starts over. A DialoGPT chat
    turn then costs its own tokens, not the whole history's. Pass it as `cache=` to generate or
    stream. One conversation at a time: a cache in use by another generation is refused.
    """

    state: object | None = None  # the DecodeState whose buffers hold the conversation
    _busy: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def clear(self) -> None:
        self.state = None

    @property
    def tokens(self) -> int:
        """How many tokens' keys and values the cache holds."""
        return 0 if self.state is None else self.state.T

    def acquire(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise Gpt2OnnxError("this PromptCache is in use by another generation; give each conversation its own cache")

    def release(self) -> None:
        self._busy.release()
