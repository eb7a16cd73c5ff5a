"""Request ids and the server's log: what lets an operator match a client's report, a gateway's trace
and a server error to each other.

Every request gets an id: the client's `X-Request-Id` when it sends a usable one (vLLM's and most
gateways' header), else a fresh one; the response carries it back in `X-Request-Id`, and a
completion's `id` is built on it (`cmpl-<id>`, as vLLM does). Server errors (5xx other than a
shutdown's 503, streamed ones included) are logged with the id, one line each, an internal error
with its traceback; `--access-log` adds one line per request (method, path, status, seconds, id).
Lines go to stderr with a UTC timestamp. Client errors (4xx) are the client's to read: not logged.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid

log = logging.getLogger("gpt2onnx.serve")
HEADER = "x-request-id"
_USABLE = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")  # what can sit in an id and a log line unquoted


def request_id(scope: dict) -> str:
    """The id of the request in `scope` (set by RequestIds)."""
    return scope.get("state", {}).get("request_id") or uuid.uuid4().hex


def configure(access_log: bool) -> None:
    """The gpt2onnx loggers (this one, and the scheduler's) to stderr with a UTC timestamp; INFO (the
    access log) only when asked."""
    root = logging.getLogger("gpt2onnx")
    if not any(getattr(h, "gpt2onnx", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.gpt2onnx = True
        fmt = logging.Formatter("%(asctime)s gpt2onnx %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%SZ")
        fmt.converter = time.gmtime
        h.setFormatter(fmt)
        root.addHandler(h)
        root.propagate = False
    root.setLevel(logging.INFO if access_log else logging.WARNING)


def server_error(scope: dict, status: int, message: str, exc: BaseException | None = None) -> None:
    """Log a 5xx the server answered (a shutdown's 503 is expected: not logged)."""
    if status >= 500 and status != 503:
        log.error("%s %s %d request_id=%s: %s", scope.get("method", "-"), scope.get("path", "-"), status,
                  request_id(scope), message, exc_info=exc)


class RequestIds:
    """ASGI middleware: the request id into scope["state"] and the response's X-Request-Id, and the
    access-log line when the response ends."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == HEADER.encode()), "")
        rid = given if _USABLE.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        t0, status = time.perf_counter(), [0]

        async def tagged(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg["headers"] = [*msg.get("headers", []), (HEADER.encode(), rid.encode())]
            elif msg["type"] == "http.response.body" and not msg.get("more_body") and log.isEnabledFor(logging.INFO):
                log.info('%s "%s %s" %d %.3fs request_id=%s', (scope.get("client") or ("-",))[0], scope["method"],
                         scope["path"], status[0], time.perf_counter() - t0, rid)
            await send(msg)

        await self.app(scope, receive, tagged)
