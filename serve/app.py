"""The OpenAI-compatible routes over one Scheduler per model.

    POST /v1/completions        prompt (text, texts, ids, lists of ids) -> text_completion
    POST /v1/chat/completions   messages -> DialoGPT turns (each content + <|endoftext|>) -> chat.completion
    GET  /v1/models             one id per artifact
    GET  /health                open, even with an API key
    GET  /metrics               Prometheus text

Streaming answers are server-sent events in OpenAI's chunk format ending with `data: [DONE]`.
Every error is OpenAI's error JSON with the status it names: 400 bad request, 401 bad API key,
404 unknown model, 413 body too large, 429 queue full and 503 shutting down (both with
Retry-After), 504 timed out. A client that goes away cancels its requests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2onnx.runtime import Engine, Gpt2OnnxError, QueueFull, Scheduler
from gpt2onnx.runtime.request import Result, Token

from .config import ServeConfig
from .metrics import Metrics
from .protocol import ChatCompletionRequest, CompletionRequest, error_body


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.retry_after = status, message, type_, param, code, retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status, headers=headers)


@dataclass
class Model:
    """One served artifact: its name (the `model` field), engine and scheduler."""

    name: str
    engine: Engine
    scheduler: Scheduler
    created: int


def build_app(models: list[Model], cfg: ServeConfig) -> FastAPI:
    """The FastAPI app serving `models`; closing it (lifespan end) closes their schedulers."""
    by_name = {m.name: m for m in models}
    metrics = Metrics(models)
    state = {"closing": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state["closing"] = True  # new /v1 requests get 503 while in-flight ones finish
        await asyncio.gather(*(asyncio.to_thread(m.scheduler.close, False, cfg.shutdown_timeout_s) for m in models))

    app = FastAPI(title="gpt2onnx", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.models, app.state.metrics, app.state.serve = by_name, metrics, state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.errors.labels(status=str(e.status)).inc()
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return APIError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else "server_error").response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return APIError(400, str(e.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        metrics.errors.labels(status="500").inc()
        return APIError(500, f"internal error: {type(e).__name__}", "server_error").response()

    def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise APIError(401, "invalid or missing API key; send it as 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def read_body(request: Request, kind):
        """The JSON body, size-limited and validated into `kind`."""
        if state["closing"]:
            raise APIError(503, "the server is shutting down; retry on another replica", "server_error",
                           retry_after=cfg.retry_after_s)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes is over this server's limit of {cfg.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise APIError(413, f"request body is over this server's limit of {cfg.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        try:
            body = kind.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(str(x) for x in err.get("loc", ()))
            raise APIError(400, f"{param}: {err.get('msg')}" if param else str(err.get("msg")), param=param or None) from None
        if body.model not in by_name:
            raise APIError(404, f"model {body.model!r} does not exist; GET /v1/models lists this server's models",
                           param="model", code="model_not_found")
        why = body.unsupported()
        if why:
            raise APIError(400, why)
        return body, by_name[body.model]

    def submit_all(model: Model, prompts: list, n: int, kw: dict) -> list:
        """One scheduler request per prompt and choice; all or none (a failure cancels the rest)."""
        handles = []
        try:
            for p in prompts:
                for i in range(n):
                    seed = kw.get("seed")
                    handles.append(model.scheduler.submit(p, **{**kw, **({"seed": seed + i} if seed is not None else {})}))
        except QueueFull as e:
            for h in handles:
                h.cancel()
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", retry_after=cfg.retry_after_s) from None
        except Gpt2OnnxError as e:
            for h in handles:
                h.cancel()
            if "shut down" in str(e):
                raise APIError(503, str(e), "server_error", retry_after=cfg.retry_after_s) from None
            raise APIError(400, str(e)) from None
        return handles

    async def wait_all(request: Request, handles: list) -> list[Result]:
        """Every handle's result; cancels them all if the client goes away or the timeout passes."""
        async def disconnected():
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)

        work = asyncio.ensure_future(asyncio.gather(*(h.wait() for h in handles)))
        watch = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({work, watch}, timeout=cfg.request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                return work.result()
            if watch in done:  # nobody will read this answer; nginx's "client closed request"
                raise APIError(499, "the client closed the connection")
            raise APIError(504, f"the request did not finish within {cfg.request_timeout_s:g} s", "server_error")
        except Gpt2OnnxError as e:
            raise APIError(500, str(e), "server_error") from None
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
            for h in handles:
                h.cancel()

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    async def merged(handles: list) -> AsyncIterator[tuple[int, Token | None, Result | None]]:
        """(choice index, token, None) as tokens arrive from every handle, then (index, None, result)."""
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

    async def stream(handles: list, env, token_choice, final_choice, usage, include_usage: bool) -> AsyncIterator[bytes]:
        """SSE: a chunk per token per choice, a last chunk per choice with its finish_reason, the usage
        chunk if asked, then [DONE]. `env(choices, **extra)` wraps choices in the response object."""
        deadline = time.monotonic() + cfg.request_timeout_s
        results: list[Result | None] = [None] * len(handles)
        it = merged(handles)
        try:
            while True:
                try:
                    i, tok, res = await asyncio.wait_for(it.__anext__(), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    yield sse(error_body(f"the request did not finish within {cfg.request_timeout_s:g} s", "server_error"))
                    break
                if isinstance(res, Exception):
                    yield sse(error_body(str(res), "server_error"))
                    break
                if tok is not None:
                    yield sse(env([token_choice(i, tok)]))
                else:
                    results[i] = res
                    metrics.observe(res)
                    yield sse(env([final_choice(i, res)]))
            if include_usage and all(results):
                yield sse(env([], usage=usage(results)))
            yield b"data: [DONE]\n\n"
        finally:
            await it.aclose()

    # ---- routes ---------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        status = "shutting_down" if state["closing"] else "ok"
        return JSONResponse({"status": status, "models": {m.name: m.scheduler.metrics() for m in models}},
                            status_code=503 if state["closing"] else 200)

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created, "owned_by": "gpt2onnx"}
                                           for m in models]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        body, model = await read_body(request, CompletionRequest)
        kw = gen_kw(body)
        if body.logprobs is not None:
            kw["logprobs"] = body.logprobs
        prompts = body.prompts()
        handles = submit_all(model, prompts, body.n, kw)
        echo = [model.engine.decode(h.request.ids) if body.echo else "" for h in handles]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        metrics.requests.labels(route="completions").inc()

        def logprobs_of(events: list[Token]) -> dict | None:
            if body.logprobs is None:
                return None
            toks = [model.engine.decode([e.id]) for e in events]
            offsets, at = [], len(echo[0]) if body.echo else 0
            for t in toks:
                offsets.append(at)
                at += len(t)
            return {"tokens": toks, "token_logprobs": [e.logprob for e in events], "text_offset": offsets,
                    "top_logprobs": [{model.engine.decode([t]): lp for t, lp in (e.top_logprobs or [])} for e in events]}

        def usage(results: list[Result]) -> dict:
            prompt = sum(len(h.request.ids) for h in handles[:: body.n])
            completion = sum(len(r.tokens) for r in results)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        env = envelope(rid, "text_completion", created, model.name)
        if body.stream:
            def token_choice(i: int, tok: Token) -> dict:
                text = (echo[i] if tok.index == 0 else "") + tok.text
                return {"index": i, "text": text, "logprobs": logprobs_of([tok]), "finish_reason": None}

            def final_choice(i: int, res: Result) -> dict:
                return {"index": i, "text": "", "logprobs": None, "finish_reason": finish(res)}

            return StreamingResponse(stream(handles, env, token_choice, final_choice, usage, body.include_usage),
                                     media_type="text/event-stream")
        results = await wait_all(request, handles)
        for r in results:
            metrics.observe(r)
        return env([{"index": i, "text": echo[i] + r.text, "logprobs": logprobs_of(r.logprobs or []), "finish_reason": finish(r)}
                    for i, r in enumerate(results)], usage=usage(results))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body, model = await read_body(request, ChatCompletionRequest)
        kw = gen_kw(body)
        if body.logprobs:
            kw["logprobs"] = body.top_logprobs or 0
        prompt = dialogpt_prompt(model.engine, body)
        handles = submit_all(model, [prompt], body.n, kw)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        metrics.requests.labels(route="chat").inc()

        def entry(tok_id: int, lp: float) -> dict:
            s = model.engine.decode([tok_id])
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        def logprobs_of(events: list[Token]) -> dict | None:
            if not body.logprobs:
                return None
            return {"content": [{**entry(e.id, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in (e.top_logprobs or [])]}
                                for e in events]}

        def usage(results: list[Result]) -> dict:
            completion = sum(len(r.tokens) for r in results)
            return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}

        if body.stream:
            def token_choice(i: int, tok: Token) -> dict:
                delta = {"role": "assistant", "content": tok.text} if tok.index == 0 else {"content": tok.text}
                return {"index": i, "delta": delta, "logprobs": logprobs_of([tok]), "finish_reason": None}

            def final_choice(i: int, res: Result) -> dict:
                return {"index": i, "delta": {}, "logprobs": None, "finish_reason": finish(res)}

            env = envelope(rid, "chat.completion.chunk", created, model.name)
            return StreamingResponse(stream(handles, env, token_choice, final_choice, usage, body.include_usage),
                                     media_type="text/event-stream")
        results = await wait_all(request, handles)
        for r in results:
            metrics.observe(r)
        env = envelope(rid, "chat.completion", created, model.name)
        return env([{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": logprobs_of(r.logprobs or []),
                     "finish_reason": finish(r)} for i, r in enumerate(results)], usage=usage(results))

    def gen_kw(body) -> dict:
        try:
            return body.generation(cfg.default_max_tokens, cfg.max_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param="max_tokens") from None

    return app


def envelope(rid: str, kind: str, created: int, model: str):
    """The response object around a list of choices (OpenAI's id / object / created / model)."""
    return lambda choices, **extra: {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}


def finish(r: Result) -> str:
    """OpenAI's finish_reason: stop (EOS or a stop string) or length."""
    return "stop" if r.finish_reason == "stop" else "length"


def dialogpt_prompt(engine: Engine, body: ChatCompletionRequest) -> list[int]:
    """DialoGPT's format: every turn's text followed by <|endoftext|>, the model continues after the
    last. System (and developer) messages are dropped: DialoGPT was trained on conversation turns
    only and has no instruction channel."""
    eos = engine.eos_token_id
    turns = [m for m in body.messages if m.role in ("user", "assistant")]
    if not turns:
        raise APIError(400, "messages hold no user or assistant turn (system messages are ignored by DialoGPT models)", param="messages")
    ids: list[int] = []
    for m in turns:
        if m.content:
            ids += engine.tokenizer.encode(m.content, add_special_tokens=False).ids
        ids.append(eos)
    return ids
