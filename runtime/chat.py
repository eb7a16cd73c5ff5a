"""DialoGPT chat: every turn is its text followed by `<|endoftext|>`; the model continues the history.

`turn`, `encode_turns`, `fit_history` and `joined` are the one place that format and truncate a DialoGPT
history: the chat session here, the server's /v1/chat/completions, the trained model's data
(export/train.py) and the benchmarks' conversations use them. A history that does not fit loses
its oldest whole turns (what DialoGPT users do), on every path.

The session keeps the KV cache of the last turn (a PromptCache), so each turn runs only its new
tokens through the model, not the whole history. When the history and the reply would not fit the
position table, the oldest turns are dropped (whole turns, so the model never sees half a
sentence); every position then shifts, so that turn runs the kept history again. With beam search
(num_beams > 1) every turn runs the whole history: the beams' rows of the cache end up holding
other hypotheses than the reply chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from .errors import ContextOverflow, Gpt2OnnxError, require_utf8
from .prompt_cache import PromptCache
from .sampling import GenerationConfig


def turn(ids: Sequence[int], eos: int) -> list[int]:
    """One DialoGPT turn: its tokens followed by `<|endoftext|>` (`eos`)."""
    return [*ids, eos]


def encode_turns(tokenizer, texts: Sequence[str | None], eos: int) -> list[list[int]]:
    """Each text as a DialoGPT turn. `tokenizer`: a `tokenizers.Tokenizer`; None or "" is an empty turn.

    Raises:
        Gpt2OnnxError: a text UTF-8 cannot encode (param "messages")."""
    for i, t in enumerate(texts):
        require_utf8(t or "", f"message {i}", "messages")
    return [turn(tokenizer.encode(t or "", add_special_tokens=False).ids, eos) for t in texts]


def joined(turns: Sequence[Sequence[int]]) -> list[int]:
    """A history's prompt: its turns one after another (the model continues after the last EOS)."""
    return [t for tu in turns for t in tu]


def fit_history(turns: Sequence[list[int]], budget: int) -> list[list[int]]:
    """The newest whole turns whose tokens total at most `budget`: the oldest are dropped first, so
    the model never sees half a turn.

    Raises:
        Gpt2OnnxError: the newest turn alone is longer than `budget`.
    """
    if not turns or len(turns[-1]) > budget:
        n = len(turns[-1]) if turns else 0
        raise Gpt2OnnxError(f"the last message ({n} tokens) does not fit the {budget} tokens left for history "
                            "beside the reply; shorten it or ask for fewer new tokens")
    kept, size = [], 0
    for t in reversed(turns):
        if size + len(t) > budget:
            break
        kept.append(t)
        size += len(t)
    return kept[::-1]


class ChatSession:
    """One conversation; not shared between threads (its cache serves one generation at a time)."""

    def __init__(self, engine, cfg: GenerationConfig):
        if cfg.max_new_tokens >= engine.n_positions:  # as every other entry point refuses it
            raise ContextOverflow(0, 0, cfg.max_new_tokens, engine.n_positions)
        self.engine = engine
        self.cfg = replace(cfg, eos_token_id=engine.eos_token_id if cfg.eos_token_id is None else cfg.eos_token_id)
        self.turns: list[list[int]] = []  # token ids of each turn, each ending with EOS
        self.cache = PromptCache()

    def reset(self) -> None:
        """Forget the history."""
        self.turns.clear()
        self.cache.clear()

    def send(self, text: str) -> str:
        """Add the user's turn, generate the reply, remember both; returns the reply text (cut before a
        stop string, as generate_text's; the history keeps the reply's tokens, whose keys the cache holds)."""
        eos = self.engine.eos_token_id
        user = turn(self.engine.encode(text) if text != "" else [], eos)  # "": an empty turn, as the server takes it
        self.turns = fit_history(self.turns + [user], self.engine.n_positions - self.cfg.max_new_tokens)
        prompt = joined(self.turns)
        req = self.engine.request(prompt, self.cfg, stream=False)
        for _ in self.engine.run([req], self.cache if self.cfg.num_beams == 1 else None):
            pass
        reply = req.tokens
        if not reply or reply[-1] != eos:
            reply = turn(reply, eos)  # close the turn so the next one starts cleanly
        self.turns.append(reply)
        return req.text.text
