"""Next-token choice from logits: greedy, or sampled with transformers' processor order.

Order (as transformers applies them): repetition penalty -> temperature -> top-k -> top-p -> draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import Gpt2OnnxError


@dataclass
class GenerationConfig:
    """One source of generation defaults; the CLI builds one of these and passes it on."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; >1 discourages tokens already in the row
    seed: int | None = None
    eos_token_id: int | None = None  # None = the model's; -1 = never stop early
    truncate: bool = False  # drop the oldest prompt tokens instead of refusing a too-long request

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise Gpt2OnnxError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise Gpt2OnnxError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k < 0:
            raise Gpt2OnnxError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise Gpt2OnnxError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise Gpt2OnnxError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    """Chooses one token per row from [batch, vocab] float32 logits."""

    def __init__(self, cfg: GenerationConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
        """logits [batch, vocab]; seen [batch, vocab] bool, tokens already in each row."""
        cfg = self.cfg
        if cfg.repetition_penalty != 1.0 and seen is not None:
            logits = np.where(seen, np.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty), logits)
        if not cfg.do_sample:
            return logits.argmax(-1)
        logits = logits.astype(np.float64) / cfg.temperature
        if cfg.top_k and cfg.top_k < logits.shape[-1]:
            kth = np.partition(logits, -cfg.top_k, axis=-1)[:, -cfg.top_k, None]
            logits = np.where(logits < kth, -np.inf, logits)
        if cfg.top_p < 1.0:
            logits = _top_p(logits, cfg.top_p)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        # inverse-CDF draw: one uniform per row, reproducible for a seed
        u = self.rng.random((probs.shape[0], 1))
        return np.minimum((probs.cumsum(-1) < u).sum(-1), probs.shape[-1] - 1)


def _top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of tokens whose probability reaches top_p (at least one)."""
    order = np.argsort(-logits, axis=-1)
    sorted_logits = np.take_along_axis(logits, order, -1)
    p = np.exp(sorted_logits - sorted_logits[:, :1])
    p /= p.sum(-1, keepdims=True)
    before = p.cumsum(-1) - p  # mass strictly before each token
    drop_sorted = before >= top_p
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, -1)
    return np.where(drop, -np.inf, logits)
