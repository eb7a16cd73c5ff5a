"""Keep one conversation's KV cache between `Engine.generate` calls: a held batch-1 row of the decode
core with the tokens it holds (the Scheduler keeps conversations in its slots the same way)."""

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

    decoder: object | None = None  # the Decoder whose row 0 holds the conversation
    ids: list[int] = field(default_factory=list)  # the tokens whose keys and values it holds
    _busy: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def clear(self) -> None:
        self.decoder, self.ids = None, []

    @property
    def tokens(self) -> int:
        """How many tokens' keys and values the cache holds."""
        return len(self.ids)

    def extends(self, prompt: list[int], max_new_tokens: int) -> bool:
        """Whether `prompt` continues the held tokens and it and its reply fit the row."""
        n = len(self.ids)
        return (self.decoder is not None and 0 < n < len(prompt) and prompt[:n] == self.ids
                and int(self.decoder.held[0]) == n and len(prompt) + max_new_tokens <= self.decoder.capacity)

    def acquire(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise Gpt2OnnxError("this PromptCache is in use by another generation; give each conversation its own cache")

    def release(self) -> None:
        self._busy.release()
