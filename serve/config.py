"""The server's settings: one dataclass, built by the CLI and passed whole. It holds the scheduler's
and the session's own option objects, so their defaults and checks live in one place (runtime/)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpt2onnx.runtime.scheduler import SchedulerConfig
from gpt2onnx.runtime.session import SessionConfig


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless asked: a model server is not for the open internet by default
    port: int = 8000
    api_key: str | None = None  # checked on every /v1 route, /tokenize and /detokenize (Authorization: Bearer KEY); /health and /metrics stay open
    max_body_bytes: int = 1 << 20  # a larger request body gets 413
    max_tokens: int = 512  # cap on max_tokens a request may ask for
    default_max_tokens: int = 16  # when a request names none (OpenAI's completions default)
    request_timeout_s: float = 300.0  # a request still running after this is cancelled (504, or an error event)
    # on SIGTERM: in-flight requests get this long, then are cancelled (answered 503 within SHUTDOWN_GRACE_S): the
    # default leaves the whole inside Kubernetes' default terminationGracePeriodSeconds of 30
    shutdown_timeout_s: float = 25.0
    retry_after_s: int = 1  # Retry-After on 429 / 503
    access_log: bool = False  # a log line per request (server errors are logged either way)
    keep_alive_s: float = 5.0  # uvicorn's (and vLLM's) default; set it above a load balancer's idle timeout
    root_path: str = ""  # the prefix a reverse proxy strips (ASGI root_path)
    allowed_origins: str | None = None  # CORS: comma-separated origins or "*"; None = no CORS headers
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # each model's scheduler
    session: SessionConfig = field(default_factory=SessionConfig)  # each model's onnxruntime session
