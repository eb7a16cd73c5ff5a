"""The OpenAI-compatible app over one Scheduler per model: wiring only.

    POST /v1/completions        serving_completion.py
    POST /v1/chat/completions   serving_chat.py
    POST /tokenize, /detokenize serving_tokenization.py
    GET  /v1/models             one id per artifact (/v1/models/{id}: one of them)
    GET  /health                open, even with an API key
    GET  /metrics               Prometheus text

Streaming is streaming.py, errors (OpenAI's error JSON with its status) errors.py, request bodies
protocol.py. The routes are module functions that read the app's models from `app.state.server`:
FastAPI keeps module-level caches keyed by endpoint function, so routes that closed over the
models would keep every app's engines and schedulers alive for the life of the process.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse

from . import errors
from .access import RequestIds
from .config import ServeConfig
from .serving import Model, ServerState, check_key, model_named, run, server_of
from .serving_chat import ChatServing
from .serving_completion import CompletionServing
from .serving_tokenization import detokenize, tokenize

__all__ = ["Model", "build_app", "health_report"]

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])  # HEAD: load balancers' checks (HAProxy's httpchk)
async def health(request: Request):
    """200 while every model's scheduler serves; 503 while draining, or when a scheduler's loop has
    stopped on an error (it refuses every request) or its engine fails every pass (Scheduler.health):
    a liveness probe should restart the server, a load balancer send elsewhere."""
    status, body = health_report(server_of(request))
    return JSONResponse(body, status_code=status)


def health_report(server) -> tuple[int, dict]:
    """/health's status code and body for one server (one Ray replica's, which it reports to the ingress)."""
    stopped = {m.name: m.scheduler.health for m in server.models.values() if m.scheduler.health}
    status = "error" if stopped else "shutting_down" if server.closing else "ok"
    body = {"status": status, "models": {m.name: m.scheduler.metrics() for m in server.models.values()}}
    if stopped:
        body["errors"] = stopped
    return (200 if status == "ok" else 503), body


@router.get("/metrics")
async def prometheus(request: Request):
    body, content_type = server_of(request).metrics.render()
    return PlainTextResponse(body, media_type=content_type)


def _model_card(m: Model) -> dict:
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "gpt2onnx"}


@router.get("/v1/models")
async def list_models(request: Request):
    check_key(request)
    return {"object": "list", "data": [_model_card(m) for m in server_of(request).models.values()]}


@router.get("/v1/models/{name}")
async def retrieve_model(request: Request, name: str):
    check_key(request)
    return _model_card(model_named(request, name))


@router.post("/v1/completions")
async def completions(request: Request):
    return await run(request, CompletionServing)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    return await run(request, ChatServing)


router.add_api_route("/tokenize", tokenize, methods=["POST"])
router.add_api_route("/detokenize", detokenize, methods=["POST"])


@asynccontextmanager
async def lifespan(app: FastAPI):
    server: ServerState = app.state.server
    server.start()
    yield
    await server.drain()  # new /v1 requests get 503 while in-flight ones finish (for shutdown_timeout_s)
    server.stop()


def build_app(models: list[Model], cfg: ServeConfig) -> FastAPI:
    """The FastAPI app serving `models`; its shutdown (lifespan end) closes their schedulers."""
    app = FastAPI(title="gpt2onnx", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = ServerState(models, cfg)
    app.add_middleware(RequestIds)
    if cfg.allowed_origins:  # browsers' cross-origin calls (vLLM's --allowed-origins); off unless asked
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in cfg.allowed_origins.split(",") if o.strip()],
                           allow_methods=["*"], allow_headers=["*"], expose_headers=["X-Request-Id", "Retry-After"])
    errors.install(app)
    app.include_router(router)
    return app
