"""DialoGPT chat: every turn is its text followed by `<|endoftext|>`; the model continues the history.

The session keeps the KV cache of the last turn (a PromptCache), so each turn runs only its new
tokens through the model, not the whole history. When the history and the reply would not fit the
position table, the oldest turns are dropped (whole turns, so the model never sees half a
sentence); every position then shifts, so that turn runs the kept history again. With beam search
(num_beams > 1) every turn runs the whole history: the beams' rows of the cache end up holding
other hypotheses than the reply chosen.
"""

from __future__ import annotations

from dataclasses import replace

from .errors import Gpt2OnnxError
from .prompt_cache import PromptCache
from .sampling import GenerationConfig


class ChatSession:
    """One conversation; not shared between threads (its cache serves one generation at a time)."""

    def __init__(self, engine, cfg: GenerationConfig):
        self.engine = engine
        self.cfg = replace(cfg, eos_token_id=engine.eos_token_id if cfg.eos_token_id is None else cfg.eos_token_id)
        self.turns: list[list[int]] = []  # token ids of each turn, each ending with EOS
        self.cache = PromptCache()

    def reset(self) -> None:
        """Forget the history."""
        self.turns.clear()
        self.cache.clear()

    def send(self, text: str) -> str:
        """Add the user's turn, generate the reply, remember both; returns the reply text."""
        eos = self.engine.eos_token_id
        user = self.engine.encode(text) + [eos]
        budget = self.engine.n_positions - self.cfg.max_new_tokens
        if len(user) > budget:
            raise Gpt2OnnxError(f"message of {len(user)} tokens does not fit the {budget} tokens left for history; shorten it")
        self.turns.append(user)
        while sum(map(len, self.turns)) > budget:
            self.turns.pop(0)
        prompt = [t for turn in self.turns for t in turn]
        req = self.engine.request(prompt, self.cfg, stream=False)
        for _ in self.engine.run([req], self.cache if self.cfg.num_beams == 1 else None):
            pass
        reply = req.tokens
        if not reply or reply[-1] != eos:
            reply = reply + [eos]  # close the turn so the next one starts cleanly
        self.turns.append(reply)
        return self.engine.decode(reply)
