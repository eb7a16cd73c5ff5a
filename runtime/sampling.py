"""Next-token choice from logits: greedy, or sampled with transformers' processor order.

Order (as transformers applies them; OpenAI's where vLLM puts them): logit bias -> repetition
penalty -> presence and frequency penalties -> no-repeat n-grams -> min_new_tokens -> temperature
-> top-k -> top-p -> min-p -> draw. (vLLM's V1 sampler applies min_p before top-k and top-p; the
two orders differ only where min_p and top_p are both set.) Which of several tokens tied at the
top-p boundary stay is numpy's sort's choice, as it is torch.sort's in transformers (they can
differ; the number kept is the same). Ties are common only in fp16 logits. (Beam search, beam.py, uses repetition penalty,
n-grams and min_new_tokens on log-probabilities, and refuses OpenAI's fields and min_p.)
Every request samples with its own generator, so a seeded request draws the same tokens whatever
else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import Gpt2OnnxError

MAX_STOP = 16  # stop strings per request
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
MAX_BEAMS = 16  # beams per prompt: each is a full row of the batch (its own KV cache)
MAX_PENALTY = 2.0  # presence / frequency penalty range, OpenAI's
# beam search's length_penalty range: new_tokens ** length_penalty (float32, up to 1024 new tokens) and a score
# over it stay finite within it (1024 ** 10 ~ 1e30); usual values are 0.6-2 (transformers' default 1)
MAX_LENGTH_PENALTY = 10.0
# repetition_penalty acts as at most this factor (at least its inverse): beyond it a seen token's logit is
# already ~0 or far below every other, and float32 logits times 1e300 overflow to inf and NaN (argmax then
# picks garbage). Any positive penalty is taken, as in transformers and vLLM; only the factor is bounded.
REPETITION_FACTOR = 1e30
MAX_BIAS = 100.0  # logit_bias range, OpenAI's: +100 forces a token, -100 bans it


@dataclass
class GenerationConfig:
    """One source of generation defaults; every entry point builds one of these and passes it on whole."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in the row
    seed: int | None = None
    eos_token_id: int | None = None  # None = the model's; -1 = never stop early
    truncate: bool = False  # drop the oldest prompt tokens instead of refusing a too-long request
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one generated
    stop_token_ids: tuple[int, ...] = ()  # further tokens that end a row (kept in its tokens, like EOS)
    logprobs: int | None = None  # None = off; k = the chosen token's log-probability and the k likeliest
    no_repeat_ngram_size: int = 0  # 0 = off; n = a row never repeats an n-gram it holds (prompt included)
    min_new_tokens: int = 0  # the stop tokens are forbidden until this many new tokens
    num_beams: int = 1  # > 1: beam search (generate, generate_text and chat; not stream or the Scheduler)
    length_penalty: float = 1.0  # beam search: a hypothesis scores log-probability / new_tokens ** length_penalty
    early_stopping: bool | str = False  # beam search: True | False | "never", as transformers
    # OpenAI's penalties over the tokens generated so far in this reply (not the prompt): a token's
    # logit loses count * frequency_penalty + (count > 0) * presence_penalty; -2..2, 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before anything else (-100..100)
    min_p: float = 0.0  # sampling: drop tokens less likely than min_p x the likeliest one's probability; 0 = off

    def validate(self) -> None:
        """Type and range checks that need no model; the engine adds the vocabulary checks."""
        _int(self.max_new_tokens, "max_new_tokens", 1)
        _bool(self.do_sample, "do_sample")
        _bool(self.truncate, "truncate")
        _float(self.temperature, "temperature")
        if self.do_sample and not self.temperature > 0:
            raise Gpt2OnnxError(f"temperature must be > 0 when sampling, got {self.temperature}", param="temperature")
        if self.temperature < 0:
            raise Gpt2OnnxError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        _int(self.top_k, "top_k", 0, hint=" (0 turns it off)")
        _float(self.top_p, "top_p")
        if not 0 < self.top_p <= 1:
            raise Gpt2OnnxError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        _float(self.repetition_penalty, "repetition_penalty")
        if not self.repetition_penalty > 0:
            raise Gpt2OnnxError(f"repetition_penalty must be > 0, got {self.repetition_penalty}", param="repetition_penalty")
        self.repetition_penalty = min(max(self.repetition_penalty, 1 / REPETITION_FACTOR), REPETITION_FACTOR)
        if self.seed is not None:
            _int(self.seed, "seed", -2**63, 2**63 - 1)  # a signed 64-bit integer, as OpenAI's and vLLM's APIs take
        if self.eos_token_id is not None:
            _int(self.eos_token_id, "eos_token_id", -1, hint=" (-1 never stops early)")
        if isinstance(self.stop, str) or not isinstance(self.stop, (tuple, list)):
            raise Gpt2OnnxError(f"stop must be a list of strings, got {type(self.stop).__name__}", param="stop")
        if len(self.stop) > MAX_STOP or not all(isinstance(s, str) and s for s in self.stop):
            raise Gpt2OnnxError(f"stop takes at most {MAX_STOP} non-empty strings, got {list(self.stop)!r}"[:300], param="stop")
        if not isinstance(self.stop_token_ids, (tuple, list)):
            raise Gpt2OnnxError(f"stop_token_ids must be a list of token ids, got {type(self.stop_token_ids).__name__}",
                                param="stop_token_ids")
        for t in self.stop_token_ids:
            _int(t, "stop_token_ids entry", 0)
        if self.logprobs is not None:
            _int(self.logprobs, "logprobs", 0, MAX_LOGPROBS)
        _int(self.no_repeat_ngram_size, "no_repeat_ngram_size", 0, hint=" (0 turns it off)")
        _int(self.min_new_tokens, "min_new_tokens", 0)
        _int(self.num_beams, "num_beams", 1, MAX_BEAMS, hint=" (1 turns beam search off)")
        _float(self.length_penalty, "length_penalty")
        if abs(self.length_penalty) > MAX_LENGTH_PENALTY:
            raise Gpt2OnnxError(f"length_penalty must be from -{MAX_LENGTH_PENALTY:g} to {MAX_LENGTH_PENALTY:g} (usually 0.6-2), "
                                f"got {self.length_penalty}", param="length_penalty")
        if isinstance(self.early_stopping, (bool, np.bool_)):
            self.early_stopping = bool(self.early_stopping)
        elif self.early_stopping != "never":
            raise Gpt2OnnxError(f'early_stopping must be true, false or "never", got {self.early_stopping!r}'[:200],
                                param="early_stopping")
        for name in ("presence_penalty", "frequency_penalty"):
            _float(getattr(self, name), name)
            if abs(getattr(self, name)) > MAX_PENALTY:
                raise Gpt2OnnxError(f"{name} must be from -{MAX_PENALTY:g} to {MAX_PENALTY:g}, got {getattr(self, name)}",
                                    param=name)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise Gpt2OnnxError(f"logit_bias must map token ids to numbers, got {type(self.logit_bias).__name__}",
                                    param="logit_bias")
            for t, b in self.logit_bias.items():
                _int(t, "logit_bias token id", 0)
                _float(b, f"logit_bias[{t}]")
                if abs(b) > MAX_BIAS:
                    raise Gpt2OnnxError(f"logit_bias[{t}] must be from -{MAX_BIAS:g} to {MAX_BIAS:g}, got {b}", param="logit_bias")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} or None
        _float(self.min_p, "min_p")
        if not 0 <= self.min_p <= 1:
            raise Gpt2OnnxError(f"min_p must be from 0 to 1 (0 turns it off), got {self.min_p}", param="min_p")
        if self.num_beams > 1 and (self.presence_penalty or self.frequency_penalty or self.logit_bias or self.min_p):
            raise Gpt2OnnxError("presence_penalty, frequency_penalty, logit_bias and min_p are not available with num_beams > 1; "
                                "drop them or set num_beams=1", param="num_beams")
        if self.num_beams > 1 and self.do_sample:
            raise Gpt2OnnxError("num_beams > 1 is beam search, which does not sample here; drop do_sample or set num_beams=1", param="num_beams")
        if self.num_beams > 1 and self.logprobs is not None:
            raise Gpt2OnnxError("logprobs is not available with num_beams > 1; drop one of them", param="num_beams")
        self.stop, self.stop_token_ids = tuple(self.stop), tuple(self.stop_token_ids)


def _field(name: str) -> str:
    """The option a check's `name` is about: "logit_bias[5]" and "logit_bias token id" -> "logit_bias"."""
    return name.split()[0].split("[")[0]


def _int(v, name: str, lo: int, hi: int | None = None, hint: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise Gpt2OnnxError(f"{name} must be an integer, got {v!r}"[:200], param=_field(name))
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"from {lo} to {hi}"
        raise Gpt2OnnxError(f"{name} must be {rng}{hint}, got {v}", param=_field(name))


def _float(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
        raise Gpt2OnnxError(f"{name} must be a finite number, got {v!r}"[:200], param=_field(name))


def _bool(v, name: str) -> None:
    if not isinstance(v, (bool, np.bool_)):
        raise Gpt2OnnxError(f"{name} must be true or false, got {v!r}"[:200], param=_field(name))


class Sampler:
    """Chooses the next token of one request from its float32 logits row [vocab]."""

    def __init__(self, cfg: GenerationConfig):
        self.cfg = cfg
        # numpy seeds with non-negative integers: a negative seed s draws from s + 2**64, so every seed has its own stream
        self.rng = np.random.default_rng(None if cfg.seed is None else cfg.seed % 2**64)
        self.greedy = (not cfg.do_sample and cfg.repetition_penalty == 1.0  # argmax of the raw logits
                       and not cfg.no_repeat_ngram_size and not cfg.min_new_tokens
                       and not cfg.presence_penalty and not cfg.frequency_penalty and not cfg.logit_bias)
        bias = cfg.logit_bias or {}
        self.bias_ids = np.fromiter(bias.keys(), np.int64, len(bias))  # [n]
        self.bias = np.fromiter(bias.values(), np.float32, len(bias))  # [n]

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None, counts: np.ndarray | None = None) -> int:
        """logits [vocab]; seen [vocab] bool, tokens already in the row (repetition penalty); counts
        [vocab] int, how often each token was generated so far (presence and frequency penalties)."""
        logits = self.warp(logits, seen, counts)
        if not self.cfg.do_sample:
            return int(logits.argmax())
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        # inverse-CDF draw: one uniform per token, reproducible for a seed. u is scaled to the sum as computed
        # (it may end a hair below 1): a u past it drew the last token of the vocabulary, filtered out or not
        cdf = probs.cumsum()
        return int((cdf < self.rng.random() * cdf[-1]).sum())

    def warp(self, logits: np.ndarray, seen: np.ndarray | None = None, counts: np.ndarray | None = None) -> np.ndarray:
        """The scores the token is chosen from: logits [vocab] after the logit bias and the penalties
        and, when sampling, temperature, top-k, top-p and min-p (float64; -inf is never drawn).
        Never writes to `logits` (a row of a shared buffer)."""
        cfg = self.cfg
        if len(self.bias_ids):
            logits = logits.copy()
            logits[self.bias_ids] += self.bias
        if cfg.repetition_penalty != 1.0 and seen is not None:
            logits = np.where(seen, np.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty), logits)
        if counts is not None and (cfg.presence_penalty or cfg.frequency_penalty):
            # OpenAI: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty
            logits = logits - counts * np.float32(cfg.frequency_penalty) - (counts > 0) * np.float32(cfg.presence_penalty)
        if not cfg.do_sample:
            return logits
        # shifted to a max of 0 before the division: a positive temperature under ~1e-308 (which passes
        # validation) would otherwise overflow the likeliest logits to inf and the softmax to NaN
        logits = logits.astype(np.float64)
        with np.errstate(over="ignore"):  # the others then overflow to -inf: never drawn, as they should not be
            logits = (logits - logits.max()) / cfg.temperature
        if cfg.top_k and cfg.top_k < logits.shape[-1]:
            kth = np.partition(logits, -cfg.top_k)[-cfg.top_k]
            logits = np.where(logits < kth, -np.inf, logits)
        if cfg.top_p < 1.0:
            logits = _top_p(logits, cfg.top_p)
        if cfg.min_p > 0:  # relative to the likeliest token: p / p_max = exp(logit - max logit)
            logits = np.where(logits < logits.max() + math.log(cfg.min_p), -np.inf, logits)
        return logits


def ngram_bans(row: np.ndarray, n: int) -> np.ndarray:
    """The tokens that would repeat an n-gram of `row` ([L] int64, prompt included), as transformers'
    NoRepeatNGramLogitsProcessor finds them: those that followed an earlier occurrence of its last n - 1 tokens."""
    if n <= 0 or len(row) < n:
        return row[:0]
    windows = np.lib.stride_tricks.sliding_window_view(row, n)  # [L - n + 1, n], a view
    return windows[(windows[:, :-1] == row[len(row) - n + 1:]).all(axis=1), -1]


def _top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of tokens whose probability reaches top_p (at least one). logits [vocab]."""
    order = np.argsort(-logits)
    sorted_logits = logits[order]
    p = np.exp(sorted_logits - sorted_logits[0])
    p /= p.sum()
    before = p.cumsum() - p  # mass strictly before each token
    drop = np.empty_like(before, dtype=bool)
    drop[order] = before >= top_p
    return np.where(drop, -np.inf, logits)


def logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` under the model's distribution (the raw logits [vocab], before
    penalties and temperature, as vLLM reports them) and the k likeliest tokens with theirs."""
    x = logits.astype(np.float64)
    lse = x.max() + math.log(np.exp(x - x.max()).sum())
    top: list[tuple[int, float]] = []
    if k:
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return float(x[token] - lse), top
