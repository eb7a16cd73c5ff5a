"""What the generation routes share: the served models, reading and checking a request, submitting
its choices to the scheduler, waiting for them, and OpenAI's response shaping (id, object, created,
model, choices, usage). A route kind (serving_completion.py, serving_chat.py) says only how its body
becomes prompts and how a token and a result become a choice.

Routes read everything from `request.app.state.server` (a ServerState), never from closures: an
app that is dropped after shutdown frees its engines and schedulers.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from gpt2onnx.runtime import Engine, Gpt2OnnxError, Scheduler
from gpt2onnx.runtime.errors import ContextOverflow
from gpt2onnx.runtime.request import Result, Token

from .access import request_id
from .config import ServeConfig
from .errors import APIError, from_runtime
from .metrics import Metrics
from .streaming import SHUT_DOWN, events

BODY_TIMEOUT_S = 30.0  # for a request's whole body to arrive (nginx's client_body_timeout is 60 s between reads)


@dataclass
class Model:
    """One served artifact: its name (the `model` field), engine and scheduler."""

    name: str
    engine: Engine
    scheduler: Scheduler
    created: int


class ServerState:
    """An app's models, settings and metrics, and whether it is shutting down (app.state.server)."""

    def __init__(self, models: list[Model], cfg: ServeConfig):
        self.models = {m.name: m for m in models}
        self.cfg = cfg
        self.metrics = Metrics(models)
        self.closing = False
        self._drain: asyncio.Future | None = None

    def start(self) -> None:
        """Before the first request (the app's lifespan; each Ray replica, whose app gets no lifespan): what is
        alive now (modules, the engines, the schedulers: ~80,000 objects) lives as long as the server; frozen
        out of the collector, a full collection walks only what requests made since (vLLM freezes its heap
        after warm-up the same way). The GC-pause histogram counts from here."""
        gc.collect()
        gc.freeze()
        self.metrics.gc.watch(True)

    def stop(self) -> None:
        """After the last request: undo `start`."""
        self.metrics.gc.watch(False)
        gc.unfreeze()

    def drain(self) -> asyncio.Future:
        """Shut down (once; every caller gets the same future): new /v1 requests get 503, the accepted ones
        run for shutdown_timeout_s, then the rest are cancelled (their clients get a 503 or a stream's error
        event) and the schedulers stop. `serve` starts it as soon as uvicorn starts shutting down; the app's
        lifespan end awaits it."""
        if self._drain is None:
            self.closing = True
            t = self.cfg.shutdown_timeout_s
            self._drain = asyncio.ensure_future(asyncio.gather(*(asyncio.to_thread(m.scheduler.close, False, t)
                                                                 for m in self.models.values())))
        return self._drain


def server_of(request: Request) -> ServerState:
    return request.app.state.server


def check_key(request: Request) -> None:
    """401 unless the request carries the server's API key (constant-time comparison)."""
    key = server_of(request).cfg.api_key
    if key is None:
        return
    scheme, token = (request.headers.get("authorization", "").split(None, 1) + ["", ""])[:2]  # any run of spaces after the scheme
    token = token.strip() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise APIError(401, "invalid or missing API key; send it as 'Authorization: Bearer KEY'", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def capped_body(request: Request, limit: int, deadline_s: float = BODY_TIMEOUT_S) -> bytes:
    """The request's body, taken as it streams in: 413 as soon as its declared length or the bytes sent
    pass `limit`, so an oversized body is never held whole (nor waited for); 408 when it has not all
    arrived within `deadline_s` (800 connections that sent all but the last bytes held 800 MB, for ever)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over this server's limit of {limit}")
    chunks: list[bytes] = []

    async def take() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over this server's limit of {limit} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(take(), deadline_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {deadline_s:g} s; send it whole") from None
    except ClientDisconnect:  # gone while sending its body: nginx's "client closed request", not a server error
        raise APIError(499, "the client closed the connection while sending the body") from None
    return b"".join(chunks)


def refuse_non_json(request: Request) -> None:
    """415 for a body sent as anything but JSON. A browser sends text/plain, a form or multipart to any
    origin without asking first (a CORS "simple request"), so a page the user visits could spend this server's
    compute if it parsed those as JSON; FastAPI's own body parsing (and so vLLM) refuses them too. No
    Content-Type is taken as JSON, as FastAPI takes it (a raw socket, some scripts)."""
    given = request.headers.get("content-type")
    if given is None:
        return
    media = given.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise APIError(415, f"the body's Content-Type is {media or 'empty'}, not JSON; send it as application/json "
                        "(curl: -H 'Content-Type: application/json')")


async def read_body(request: Request, kind: type[BaseModel]) -> BaseModel:
    """The JSON body, size-limited and validated into `kind` (400 naming the field that is wrong)."""
    server = server_of(request)
    cfg = server.cfg
    if server.closing:
        raise APIError(503, "the server is shutting down; retry on another replica", "server_error", retry_after=cfg.retry_after_s)
    refuse_non_json(request)
    body = await capped_body(request, cfg.max_body_bytes)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:  # json's decoder gives up on arrays or objects nested thousands deep
        raise APIError(400, "the body is not valid JSON: nested too deep") from None
    try:
        return kind.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [x for x in err.get("loc", ()) if not _union_tag(x)]  # pydantic names the union member it tried
        path = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc).lstrip(".")  # messages[0].role
        msg = str(err.get("msg"))
        if len(loc) == 1 and sum(1 for x in e.errors() if x.get("loc", ())[:1] == tuple(loc)) > 1:
            msg = "not one of the types this field takes; see the API reference"  # every member of a union failed
        raise APIError(400, f"{path}: {msg}" if path else msg, param=str(loc[0]) if loc else None) from None


def _union_tag(x) -> bool:
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "list", "dict") or "[" in x)


def model_named(request: Request, name: str | None) -> Model:
    """The served model called `name` (404 if none); None names the only one when there is one."""
    models = server_of(request).models
    if name is None and len(models) == 1:
        return next(iter(models.values()))
    if name is None:
        raise APIError(400, f"model is required: this server serves {len(models)} models ({', '.join(sorted(models))})",
                       param="model")
    if name not in models:
        raise APIError(404, f"model {name!r} does not exist; GET /v1/models lists this server's models",
                       param="model", code="model_not_found")
    return models[name]


def token_str(b: bytes) -> str:
    """A token's text for logprobs; one that is not whole UTF-8 on its own is "bytes:\\xNN..." as OpenAI writes it."""
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


def finish(r: Result) -> str:
    """OpenAI's finish_reason: stop (EOS or a stop string) or length."""
    return "stop" if r.finish_reason == "stop" else "length"


class Serving:
    """One generation request of a route kind; `respond()` runs it. Subclasses set the names below
    and define prompts(), token_chunk(), final_chunk() and choice()."""

    request_type: type[BaseModel]
    route: str  # the metrics label
    object: str  # the response object
    chunk_object: str  # each streamed chunk's object
    id_prefix: str

    def __init__(self, request: Request, body):
        self.request, self.body = request, body
        self.server = server_of(request)
        self.model = model_named(request, body.model)
        why = body.unsupported()
        if why:
            raise APIError(400, why[0], param=why[1])
        self.id, self.created = f"{self.id_prefix}-{request_id(request.scope)}", int(time.time())  # X-Request-Id's, as vLLM
        self.handles: list = []
        self.per_prompt = body.n  # scheduler requests per prompt: one per choice (echo alone: one, its choices alike)

    # ---- per route kind --------------------------------------------------------------------

    prompt_param = "prompt"  # the body field a too-long prompt is blamed on
    runtime_names: dict[str, str] = {}  # the runtime's option names this route's body spells otherwise

    def prompts(self, kw: dict) -> list[str | list[int]]:
        """The prompts to run, from the body; may set kw's max_new_tokens (chat's default is the room left)."""
        raise NotImplementedError

    def options(self) -> dict:
        """GenerationConfig keywords from the body."""
        cfg = self.server.cfg
        try:
            return self.body.generation(cfg.default_max_tokens, cfg.max_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param=self.body.max_tokens_asked()[0]) from None

    def token_chunk(self, i: int, tok: Token) -> dict:
        raise NotImplementedError

    def final_chunk(self, i: int, res: Result) -> dict:
        raise NotImplementedError

    def choice(self, i: int, res: Result) -> dict:
        raise NotImplementedError

    def prompt_tokens(self) -> int:
        return sum(len(h.request.ids) for h in self.handles[:: self.per_prompt])

    # ---- OpenAI's response shaping ---------------------------------------------------------

    def envelope(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model.name, "choices": choices, **extra}

    def chunk(self, choices: list[dict], **extra) -> dict:
        if self.body.include_usage:  # OpenAI: with include_usage every chunk carries usage, null until the last
            extra.setdefault("usage", None)
        return self.envelope(self.chunk_object, choices, **extra)

    def usage(self, results: list[Result]) -> dict:
        prompt, completion = self.prompt_tokens(), sum(len(r.tokens) for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- the flow --------------------------------------------------------------------------

    async def respond(self):
        """Submit every prompt x n choices, then stream (SSE) or wait for the whole response."""
        kw = self.options()
        self.handles = self.submit(self.prompts(kw), kw)
        metrics = self.server.metrics
        metrics.requests.labels(route=self.route).inc()
        if self.body.stream:
            return StreamingResponse(events(self.handles, self, self.server.cfg.request_timeout_s,
                                            lambda r: metrics.observe(self.model.name, r)),
                                     media_type="text/event-stream")
        results = await self.wait()
        for r in results:
            metrics.observe(self.model.name, r)
        return await whole(lambda: self.envelope(self.object, [self.choice(i, r) for i, r in enumerate(results)],
                                                 usage=self.usage(results)))

    def submit(self, prompts: list, kw: dict) -> list:
        """One scheduler request per prompt and choice; all or none (a failure cancels the rest)."""
        sched, n = self.model.scheduler, self.per_prompt
        room = sched.config.max_batch + sched.config.max_queue
        if len(prompts) * n > room:  # would get 429 on every retry
            raise APIError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} sequences, more than this server "
                           f"runs and queues at once ({room}); send fewer prompts or a lower n", param="n" if n > 1 else "prompt")
        handles, seed = [], kw.get("seed")
        try:
            for k, p in enumerate(prompts):
                for i in range(n):  # choice i samples with seed + i (wrapping within OpenAI's signed 64-bit seeds)
                    wrapped = (seed + i + 2**63) % 2**64 - 2**63 if seed is not None else None
                    handles.append(sched.submit(p, index=k, **{**kw, **({"seed": wrapped} if seed is not None else {})}))
        except Gpt2OnnxError as e:
            for h in handles:
                h.cancel()
            if isinstance(e, ContextOverflow):
                field = self.body.max_tokens_asked()[0]
                fix = ("lower it" if e.param == "max_new_tokens" else f"shorten the {self.prompt_param}"
                       + (f" or lower {field}" if e.max_new else ""))  # max_tokens 0 (echo alone): the prompt alone is too long
                raise APIError(400, f"{e.describe(field)}; {fix}", param=field if e.param == "max_new_tokens" else self.prompt_param,
                               code="context_length_exceeded") from None
            names = {"prompt": self.prompt_param, "max_new_tokens": self.body.max_tokens_asked()[0], **self.runtime_names}
            raise from_runtime(e, self.server.cfg.retry_after_s, names) from None
        return handles

    async def wait(self) -> list[Result]:
        """Every handle's result; cancels them all if the client goes away or the timeout passes."""
        request, handles, timeout = self.request, self.handles, self.server.cfg.request_timeout_s

        async def disconnected():
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)

        work = asyncio.ensure_future(asyncio.gather(*(h.wait() for h in handles)))
        watch = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({work, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                results = work.result()
                if any(r.finish_reason == "cancelled" for r in results):  # only a shutdown cancels what a client waits for
                    raise APIError(503, SHUT_DOWN, "server_error", retry_after=self.server.cfg.retry_after_s)
                return results
            if watch in done:  # nobody will read this answer; nginx's "client closed request"
                raise APIError(499, "the client closed the connection")
            raise APIError(504, f"the request did not finish within {timeout:g} s", "server_error")
        except Gpt2OnnxError as e:  # the engine failed while generating: not the client's fault
            raise APIError(500, str(e), "server_error") from None
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
            # read the outcome of the cancelled gather, or asyncio logs "exception was never retrieved" per request
            work.add_done_callback(lambda f: f.cancelled() or f.exception())
            for h in handles:
                h.cancel()


async def whole(build) -> Response:
    """A response sent whole (not streamed): `build()`'s dict shaped and encoded to JSON in a worker thread,
    not on the event loop that feeds every other client's stream. Sixteen echoed 1,000-token prompts with
    logprobs 5 are a 4 MB body: built on the loop (through FastAPI's jsonable_encoder walk, which a dict of
    plain JSON types does not need) it held a concurrent stream's next token 839 ms, in a thread 128 ms (medians,
    DialoGPT-small int8, 2 cores: reports/serve-stall). Encoded as Starlette's JSONResponse encodes."""
    body = await asyncio.to_thread(lambda: json.dumps(build(), ensure_ascii=False, allow_nan=False, indent=None,
                                                      separators=(",", ":")).encode())
    return Response(body, media_type="application/json")


async def run(request: Request, kind: type[Serving]):
    """A generation route: check the key, read the body, respond."""
    check_key(request)
    body = await read_body(request, kind.request_type)
    return await kind(request, body).respond()
