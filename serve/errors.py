"""Errors as OpenAI's error JSON with the status they name, told apart by type, never by message.

    400 bad request (a runtime Gpt2OnnxError)      401 bad API key       404 unknown model
    413 body too large                            429 queue full (QueueFull)
    503 shutting down (SchedulerClosed)           504 timed out         500 anything else
429 and 503 carry Retry-After. The handlers are module functions (not closures over an app), so
FastAPI's caches keyed by handler keep nothing of an app alive.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2onnx.runtime import Gpt2OnnxError, QueueFull, SchedulerClosed

from .access import server_error
from .protocol import error_body


class APIError(Exception):
    """An error response: status, OpenAI's message / type / param / code, and Retry-After if any."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.retry_after = status, message, type_, param, code, retry_after
        self.headers = {**(headers or {}), **({"Retry-After": str(retry_after)} if retry_after is not None else {})}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers or None)


def from_runtime(e: Gpt2OnnxError, retry_after_s: int, names: dict[str, str] | None = None) -> APIError:
    """The response for an error the runtime raised while taking a request; `names` turns the runtime's
    option names into the body's (max_new_tokens -> max_tokens, prompt -> messages) for `param`."""
    if isinstance(e, QueueFull):
        return APIError(429, str(e), "rate_limit_error", code="queue_full", retry_after=retry_after_s)
    if isinstance(e, SchedulerClosed):
        return APIError(503, str(e), "server_error", retry_after=retry_after_s)
    return APIError(400, str(e), param=(names or {}).get(e.param, e.param))


def _count(request: Request, status: int) -> None:
    server = getattr(request.app.state, "server", None)
    if server is not None:
        server.metrics.errors.labels(status=str(status)).inc()


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    _count(request, e.status)
    server_error(request.scope, e.status, e.message)
    return e.response()


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    # routing's own errors: 404 for an unknown path, 405 for a wrong method
    _count(request, e.status_code)
    return APIError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error",
                    headers=e.headers).response()  # a 405's Allow


async def _internal(request: Request, e: Exception) -> JSONResponse:
    _count(request, 500)
    server_error(request.scope, 500, f"internal error: {type(e).__name__}: {e} (uvicorn logs its traceback)")
    return APIError(500, f"internal error: {type(e).__name__}", "server_error").response()


def install(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's format."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal)
