"""The concurrent scenario's closed-loop client driver, and what a system without a scheduler does with
those clients (one request at a time behind a lock). Every record it returns is
{prompt_len, new_tokens, submitted_s, token_s}: time.perf_counter() stamps, whatever served them."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np


@contextlib.contextmanager
def served(app) -> Iterator[str]:
    """The ASGI `app` served by uvicorn in a thread of this process on a free loopback port; yields its base URL
    (http://127.0.0.1:PORT). On exit uvicorn stops as SIGTERM stops it (the app's shutdown closes its schedulers)."""
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("uvicorn stopped before it served (its log says why)")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def run_clients(serve, requests: list[tuple[list[int], int]], clients: int) -> list[dict]:
    """Closed loop: `clients` threads each take the next request as soon as their last one is done.

    `serve(prompt, new_tokens)` blocks until the reply is complete and returns (submitted_s, token_s):
    when it was submitted and when each of its tokens came out. Returns one record per request, in
    request order; an exception in any client is raised here."""
    take = threading.Lock()
    pending = iter(enumerate(requests))
    out: list[dict] = [{} for _ in requests]

    def client() -> None:
        while True:
            with take:
                nxt = next(pending, None)
            if nxt is None:
                return
            i, (prompt, n) = nxt
            submitted, token_s = serve(prompt, n)
            out[i] = {"prompt_len": len(prompt), "new_tokens": n, "submitted_s": submitted, "token_s": [float(t) for t in token_s]}

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    return out


def token_times(start_s: float, ttft_s: float, step_s: list[float]) -> np.ndarray:
    """Per-token stamps of one `generate` from its start, its time to first token and its decode
    steps: the first token at start + ttft, each later one a step after the one before."""
    return start_s + ttft_s + np.concatenate([[0.0], np.cumsum(step_s)])


def check_reply(tokens, token_s, n: int) -> None:
    """Raises RuntimeError unless a reply has exactly `n` tokens and stamps."""
    if len(tokens) != n or len(token_s) != n:  # eos_token_id=-1: a reply shorter or longer than asked is a bug, not a figure
        raise RuntimeError(f"a {n}-token request got {len(tokens)} tokens and {len(token_s)} token stamps")


class SerialClients:
    """What a service without a scheduler does: one request at a time through `_one`, behind a lock.

    `_one(prompt, new_tokens) -> (tokens, token_s)` must return exactly `new_tokens` tokens."""

    def concurrent(self, mode: str, clients: int, requests, max_batch: int) -> list[dict]:
        if mode != "serial":
            raise ValueError(f"{type(self).__name__} runs the concurrent scenario serially only, not {mode!r}")
        lock = threading.Lock()

        def serve(prompt, n):
            submitted = time.perf_counter()
            with lock:  # the queue wait is part of the time to first token
                tokens, token_s = self._one(prompt, n)
            check_reply(tokens, token_s, n)
            return submitted, token_s

        return run_clients(serve, requests, clients)
