"""One request: its prompt, its options, its sampler, its output so far and its timings.

Every entry point (Engine.generate / generate_text / stream / chat and the Scheduler) turns its
input into Request objects through `Engine.request`, so all validate the same way, and each
request's state lives here, never on the shared Engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import Gpt2OnnxError
from .sampling import GenerationConfig, Sampler, logprobs, ngram_bans


@dataclass
class Stats:
    """Timings of one generation (seconds; `*_s` stamps are time.perf_counter() values)."""

    batch: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused, not run again
    new_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0  # from the request to the first new token (queue wait, buffers, prefill, sampling)
    decode_s: float = 0.0
    step_s: list[float] = field(default_factory=list)  # decode step durations
    submitted_s: float = 0.0  # when the request was made
    token_s: list[float] = field(default_factory=list)  # when each new token was ready

    @property
    def per_token_ms(self) -> float:
        """Mean decode step time (ms)."""
        return 1e3 * self.decode_s / max(1, len(self.step_s))

    @property
    def per_token_p50_ms(self) -> float:
        """Median decode step time (ms): robust to a slow first step or a noisy neighbour."""
        return 1e3 * float(np.median(self.step_s)) if self.step_s else 0.0


@dataclass
class Token:
    """One generated token as a consumer sees it. `text` is the new text it completes (may be ""
    while a multi-byte character or a possible stop string is incomplete)."""

    id: int
    text: str
    index: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-probability), likeliest first


@dataclass
class Result:
    tokens: list[int]  # new tokens, the EOS / stop token included
    text: str  # their text, cut before a stop string
    finish_reason: str  # stop | length | cancelled | error
    logprobs: list[Token] | None
    stats: Stats
    error: str | None = None
    prompt_logprobs: list[Token] | None = None  # the prompt's tokens scored (Scheduler.submit's prompt_logprobs)


class TextStream:
    """Incremental detokenization: pieces never end inside a multi-byte character, and text that
    could be the start of a stop string is held until it is known not to be one."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were rendered already; decoding from `prefix` keeps context
        self.text = ""  # all complete text so far
        self.sent = 0  # characters of `text` handed out
        self.stopped = False
        # per stop string, KMP's failure table and how much of it the text now ends with: each new character
        # costs O(1) amortized (the hold-back looked at every tail of every length each token: O(len(stop)^2),
        # 62 ms a token with 16 stop strings of 6,200 characters, on the scheduler's thread)
        self._fail = [_failure(s) for s in stop]
        self._state = [0] * len(stop)
        self._scanned = 0  # characters of `text` the automata have read

    def push(self, token: int) -> str:
        """Add a token; returns the text now safe to show."""
        self.ids.append(token)
        shown, text = self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            self.text += text[len(shown):]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The remaining text: bytes that never completed a character, as the decoder renders them."""
        if not self.stopped:
            tail = self.decode(self.ids[self.prefix:])[len(self.decode(self.ids[self.prefix:self.read])):]
            self.text += tail
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            hits = self._scan()
            if hits:  # the earliest-starting stop string the new text completes
                self.text, self.stopped = self.text[: min(hits)], True
        end = size = len(self.text)
        if self.stop and not self.stopped and not final:  # hold the tail that is the start of a stop string
            end = size - max(self._state)
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def _scan(self) -> list[int]:
        """Feed the text added since the last scan to each stop string's automaton; returns where each
        one completed in it starts (none before: the text would have stopped there)."""
        text, start, hits = self.text, self._scanned, []
        self._scanned = len(text)
        for k, (s, fail) in enumerate(zip(self.stop, self._fail)):
            q = self._state[k]
            for i in range(start, len(text)):
                c = text[i]
                while q and s[q] != c:
                    q = fail[q - 1]
                if s[q] == c:
                    q += 1
                if q == len(s):
                    hits.append(i + 1 - q)
                    break
            self._state[k] = q
        return hits


def _failure(s: str) -> list[int]:
    """KMP's table: for each prefix s[:i + 1], the length of its longest proper prefix that is also its suffix."""
    fail, q = [0] * len(s), 0
    for i in range(1, len(s)):
        while q and s[i] != s[q]:
            q = fail[q - 1]
        if s[i] == s[q]:
            q += 1
        fail[i] = q
    return fail


SCORE_CHUNK = 128  # tokens per scoring pass: its logits are 128 x 50257 floats (26 MB), whatever the prompt's length


class PromptScores:
    """A prompt's tokens scored as its passes run: each token with its log-probability given the tokens
    before it (the first token has none) and its `top` likeliest alternatives, computed as generated
    tokens' are (`sampling.logprobs`, raw logits), and its text. Engine.score and the Scheduler's
    prompt_logprobs (vLLM's name for it) fill it pass by pass."""

    def __init__(self, ids: list[int], top: int, decode: Callable[[list[int]], str]):
        self.ids, self.top, self.text = ids, top, TextStream(decode)
        self.tokens = [Token(ids[0], self.text.push(ids[0]), 0)]
        self._finish()

    @property
    def done(self) -> bool:
        return len(self.tokens) == len(self.ids)

    def add(self, start: int, logits: np.ndarray) -> None:
        """The logits [n, vocab] of a pass over the prompt's tokens start .. start + n - 1: position p's
        predict token p + 1."""
        for p in range(start + 1, min(start + len(logits) + 1, len(self.ids))):
            lp, top = logprobs(logits[p - 1 - start], self.ids[p], self.top)
            self.tokens.append(Token(self.ids[p], self.text.push(self.ids[p]), p, lp, top))
        self._finish()

    def _finish(self) -> None:
        if self.done:
            self.tokens[-1].text += self.text.finish()


class Request:
    """A validated request and its output. Made by `Engine.request`; consumed by one decode loop."""

    def __init__(self, ids: list[int], cfg: GenerationConfig, eos: int, decode: Callable[[list[int]], str], vocab: int,
                 prompt_logprobs: int | None = None, score_only: bool = False):
        self.ids, self.cfg = ids, cfg
        self.stop_ids = frozenset(([] if eos < 0 else [eos]) + list(cfg.stop_token_ids))
        bad = [t for t in cfg.logit_bias or () if t >= vocab]
        if bad:
            raise Gpt2OnnxError(f"logit_bias token id {bad[0]} is outside the vocabulary 0..{vocab - 1}", param="logit_bias")
        self.sampler = Sampler(cfg)
        self.seen: np.ndarray | None = None  # [vocab] bool, only with a repetition penalty
        if cfg.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab, bool)
            self.seen[ids] = True
        self.counts: np.ndarray | None = None  # [vocab] int32, each token's count in the reply so far: OpenAI's penalties
        if cfg.presence_penalty or cfg.frequency_penalty:
            self.counts = np.zeros(vocab, np.int32)
        self.row: np.ndarray | None = None  # [prompt + max_new_tokens] int64 (prompt, then each new token): n-gram bans
        if cfg.no_repeat_ngram_size:
            self.row = np.zeros(len(ids) + cfg.max_new_tokens, np.int64)
            self.row[: len(ids)] = ids
        self.text = TextStream(decode, cfg.stop)
        self.tokens: list[int] = []
        self.events: list[Token] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.stats = Stats(batch=1, prompt_tokens=len(ids), submitted_s=time.perf_counter())
        self.cancelled = False
        self.cv = threading.Condition()
        self.wakers: list[Callable[[], None]] = []  # async consumers' callbacks
        self.followers = 0  # blocking iterators waiting token by token
        # Scheduler.submit(prompt_logprobs=k): the prompt's tokens scored as its passes run
        self.prompt_scores = PromptScores(ids, prompt_logprobs, decode) if prompt_logprobs is not None else None
        self.score_only = score_only  # Scheduler.submit(max_new_tokens=0): ends after its prompt pass, nothing generated

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def greedy(self) -> bool:
        """The next token is the argmax of the raw logits (no sampling, penalty, ban or bias) and no
        log-probabilities are asked for: a device pick's id serves it (decoder.py, Pick)."""
        return self.sampler.greedy and self.cfg.logprobs is None

    def take(self, out: np.ndarray) -> Token:
        """`choose` from logits [vocab], or accept a token already picked (a 0-d id from a device pick)."""
        return self.accept(int(out)) if out.ndim == 0 else self.choose(out)

    def choose(self, logits: np.ndarray) -> Token:
        """Sample the next token from logits [vocab], record it and decide whether the request ends."""
        t = self.sampler(self.constrain(logits), self.seen, self.counts)
        lp, top = logprobs(logits, t, self.cfg.logprobs) if self.cfg.logprobs is not None else (None, None)
        return self.accept(t, lp, top)

    def constrain(self, logits: np.ndarray) -> np.ndarray:
        """logits [vocab] with the tokens min_new_tokens and no_repeat_ngram_size forbid now set to
        -inf (a copy, made only when they forbid some)."""
        cfg, n = self.cfg, len(self.tokens)
        early = bool(self.stop_ids) and n < cfg.min_new_tokens
        bans = ngram_bans(self.row[: len(self.ids) + n], cfg.no_repeat_ngram_size) if self.row is not None else None
        if not early and (bans is None or not len(bans)):
            return logits
        logits = logits.copy()
        if early:
            logits[list(self.stop_ids)] = -np.inf
        if bans is not None:
            logits[bans] = -np.inf
        return logits

    def accept(self, t: int, lp: float | None = None, top=None) -> Token:
        now = time.perf_counter()
        if not self.tokens:
            self.stats.ttft_s = now - self.stats.submitted_s
        self.tokens.append(t)
        self.stats.token_s.append(now)
        self.stats.new_tokens = len(self.tokens)
        if self.row is not None:
            self.row[len(self.ids) + len(self.tokens) - 1] = t
        if self.seen is not None:
            self.seen[t] = True
        if self.counts is not None:
            self.counts[t] += 1
        ev = Token(t, self.text.push(t), len(self.tokens) - 1, lp, top)
        if t in self.stop_ids or self.text.stopped:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.cfg.max_new_tokens:
            self.finish_reason = "length"
        if self.done:
            ev.text += self.text.finish()
        self._publish(ev)
        return ev

    def end(self, reason: str, error: str | None = None) -> None:
        """Finish early (cancelled, error) or without a last token."""
        if not self.done:
            self.finish_reason, self.error = reason, error
            self._publish(None)

    def _publish(self, ev: Token | None) -> None:
        if self.done:  # what only choosing the next token needs goes (a kept handle holds only the output)
            self.seen = self.counts = self.row = None
        with self.cv:
            if ev is not None:
                self.events.append(ev)
            # wake only consumers that want this event: a thread waiting for the whole result
            # sleeps until the end (on 2 cores every wake-up takes a core from onnxruntime's threads)
            if self.followers or self.done:
                self.cv.notify_all()
            wakers = list(self.wakers)
        for wake in wakers:
            wake()

    def result(self) -> Result:
        lps = list(self.events) if self.cfg.logprobs is not None else None
        return Result(list(self.tokens), self.text.text, self.finish_reason or "length", lps, self.stats, self.error,
                      self.prompt_scores.tokens if self.prompt_scores else None)
