"""Server-sent events: the tokens of every choice of a request, merged as they arrive, in OpenAI's
chunk format, ending with `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from gpt2onnx.runtime.request import Result, Token

from .access import server_error
from .protocol import error_body

SHUT_DOWN = "the server shut down before the request finished; retry it on another replica"


def sse(obj) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def merged(handles: list) -> AsyncIterator[tuple[int, Token | None, Result | Exception | None]]:
    """(choice index, token, None) as tokens arrive from every handle, then (index, None, result),
    or (index, None, exception) for a choice that failed. Leaving early cancels every handle."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h) -> None:
        try:
            async for tok in h:
                queue.put_nowait((i, tok, None))
            queue.put_nowait((i, None, h.request.result()))
        except Exception as e:  # noqa: BLE001 - reported to the stream as an error event
            queue.put_nowait((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    left = len(handles)
    try:
        while left:
            item = await queue.get()
            if item[1] is None:
                left -= 1
            yield item
    finally:
        for t in tasks:
            t.cancel()
        for h in handles:
            h.cancel()


def failed(shape, status: int, message: str) -> bytes:
    """The error event of a stream whose 200 is already sent: counted and logged with the status the
    same error gets unstreamed."""
    shape.server.metrics.errors.labels(status=str(status)).inc()
    server_error(shape.request.scope, status, message)
    return sse(error_body(message, "server_error"))


async def events(handles: list, shape, timeout_s: float, observe: Callable[[Result], None]) -> AsyncIterator[bytes]:
    """The SSE body: a chunk per token per choice, a last chunk per choice with its finish_reason,
    the usage chunk if the request asked for it, then [DONE]. `shape` is the route's serving object
    (token_chunk, final_chunk, usage, chunk envelope); `observe` records each finished choice."""
    deadline = time.monotonic() + timeout_s
    results: list[Result | None] = [None] * len(handles)
    it = merged(handles)
    late = f"the request did not finish within {timeout_s:g} s"
    timed_out = False

    def cut() -> None:  # the deadline, kept even while this generator waits on a client that does not read
        nonlocal timed_out
        timed_out = True
        for h in handles:
            h.cancel()

    watchdog = asyncio.get_running_loop().call_later(timeout_s, cut)
    try:
        while True:
            try:
                i, tok, res = await asyncio.wait_for(it.__anext__(), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                yield failed(shape, 504, late)
                break
            if isinstance(res, Exception):
                yield failed(shape, 500, str(res))
                break
            if res is not None and res.finish_reason == "cancelled":  # the deadline, or the server shut down mid-stream
                yield failed(shape, 504, late) if timed_out else failed(shape, 503, SHUT_DOWN)
                break
            if tok is not None:
                yield sse(shape.chunk([shape.token_chunk(i, tok)]))
            else:
                results[i] = res
                observe(res)
                yield sse(shape.chunk([shape.final_chunk(i, res)]))
        if shape.body.include_usage and all(results):
            yield sse(shape.chunk([], usage=shape.usage(results)))
        yield b"data: [DONE]\n\n"
    finally:
        watchdog.cancel()
        await it.aclose()
