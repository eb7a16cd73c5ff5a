"""Keep one conversation's KV cache between `Engine.generate` calls: a held batch-1 row of the decode
core with the tokens it holds. The Scheduler keeps conversations in its slots the same way, and both
reuse a held row by one rule: the longest prefix it shares with the next prompt (`common_prefix`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .errors import Gpt2OnnxError


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class PromptCache:
    """Keeps the KV cache of one batch-1 generation for the next request on the same conversation.

    A request runs only the tokens past the longest prefix its prompt shares with the tokens the cache
    holds (the previous prompt and its reply): a DialoGPT chat turn costs its own tokens, not the whole
    history's, and a regenerated or edited last message reruns only what changed (as llama.cpp's server
    and the Scheduler do). Pass it as `cache=` to generate or stream. One conversation at a time: a
    cache in use by another generation is refused.
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

    def reusable(self, prompt: list[int], max_new_tokens: int) -> int:
        """How many of the held tokens `prompt` can keep (0: start over): the prefix they share, less
        one when the prompt is all prefix (its last token must run to give the first logits), when the
        row holds what `ids` says and the prompt and its reply fit it."""
        if (self.decoder is None or int(self.decoder.held[0]) != len(self.ids)
                or len(prompt) + max_new_tokens > self.decoder.capacity):
            return 0
        return min(common_prefix(self.ids, prompt), len(prompt) - 1)  # prompts are never empty: >= 0

    def acquire(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise Gpt2OnnxError("this PromptCache is in use by another generation; give each conversation its own cache")

    def release(self) -> None:
        self._busy.release()
