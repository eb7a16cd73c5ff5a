"""What every system is asked to do: the same deterministic prompts, conversations and request mixes,
generated inside each worker from a few numbers, so no token list crosses the pipe."""

from __future__ import annotations

import numpy as np


def prompt_rows(batch: int, length: int, vocab: int) -> list[list[int]]:
    """Deterministic prompts: the same rows for every system (ids spread over the vocabulary)."""
    rng = np.random.default_rng(length * 1000 + batch)
    return rng.integers(0, vocab - 1, size=(batch, length)).tolist()


def run_chat(runner, turns: int, user_len: int, reply_len: int) -> dict:
    """A DialoGPT conversation: each turn a user message (`user_len` deterministic ids + EOS), then
    a reply of exactly `reply_len` tokens + EOS, the whole history being the next turn's prompt.
    Every system gets the same user messages; each continues its own replies."""
    from gpt2onnx.runtime.chat import turn  # DialoGPT's turn format, the runtime's own

    rng = np.random.default_rng(turns * 1000 + user_len)
    runner.new_conversation()
    history: list[int] = []
    out = []
    for _ in range(turns):
        history += turn(rng.integers(0, runner.vocab - 1, size=user_len).tolist(), runner.eos)
        timing, reply = runner.reply(history, reply_len)
        out.append({"prompt_len": len(history), **timing})
        history += turn(reply, runner.eos)
    return {"turns": out}


def concurrent_requests(n: int, prompt_len: tuple[int, int], reply_len: tuple[int, int], vocab: int) -> list[tuple[list[int], int]]:
    """`n` deterministic (prompt ids, reply length) pairs, lengths uniform in the inclusive ranges:
    the same list for every system (ids spread over the vocabulary, as prompt_rows)."""
    rng = np.random.default_rng([n, *prompt_len, *reply_len])
    plens = rng.integers(prompt_len[0], prompt_len[1] + 1, size=n)
    rlens = rng.integers(reply_len[0], reply_len[1] + 1, size=n)
    return [(rng.integers(0, vocab - 1, size=p).tolist(), int(r)) for p, r in zip(plens, rlens)]
