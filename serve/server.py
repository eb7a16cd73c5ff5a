"""`gpt2onnx serve`: load the artifacts, start one scheduler each, serve HTTP with uvicorn.

SIGTERM / Ctrl-C: uvicorn stops accepting connections, the schedulers finish what they hold for up to
`shutdown_timeout_s` and cancel the rest (those clients get a 503, or their stream an error event
and [DONE]), and the process exits 0.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from dataclasses import replace

from gpt2onnx.runtime import Engine, Gpt2OnnxError, Scheduler

from .app import Model, build_app
from .config import ServeConfig

SHUTDOWN_GRACE_S = 5  # after the schedulers' deadline, for the cancelled requests' handlers to answer


def model_names(artifacts: list[str]) -> list[str]:
    """Each artifact's model id: its directory's name (two alike are refused)."""
    names = [os.path.basename(os.path.normpath(a)) for a in artifacts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise Gpt2OnnxError(f"two artifacts are both named {dup[0]!r}; model ids come from directory names, rename one")
    return names


def announce(names: list[str], synthetic: list[str], host: str, port: int, cfg: ServeConfig, how: str = "") -> None:
    """The start line (what is served, where) and the synthetic-weights note, on stderr: the same
    for the plain server and --ray."""
    print(f"gpt2onnx: serving {', '.join(names)} on http://{host}:{port}/v1" + (f" ({how})" if how else "")
          + (" (API key required)" if cfg.api_key else ""), file=sys.stderr, flush=True)
    if synthetic:
        print(f"gpt2onnx: note: {', '.join(synthetic)} has synthetic weights; speed is real, the text is noise", file=sys.stderr, flush=True)


def load_models(artifacts: list[str], cfg: ServeConfig) -> list[Model]:
    """One engine and scheduler per artifact; the model id is the directory's name."""
    models = []
    for name, path in zip(model_names(artifacts), artifacts):
        engine = Engine.load(path, **vars(cfg.session))
        sched = Scheduler(engine, cfg.scheduler)
        models.append(Model(name, engine, sched, int(time.time())))
    return models


def check(cfg: ServeConfig) -> None:
    """Range checks with one-line messages (the CLI's and the Ray app's)."""
    if not 0 <= cfg.port <= 65535:
        raise Gpt2OnnxError(f"port must be from 0 to 65535, got {cfg.port}")
    for name in ("max_body_bytes", "max_tokens", "default_max_tokens"):
        if getattr(cfg, name) < 1:
            raise Gpt2OnnxError(f"{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.default_max_tokens > cfg.max_tokens:
        raise Gpt2OnnxError(f"--default-max-tokens ({cfg.default_max_tokens}) is above --max-tokens ({cfg.max_tokens}); "
                            "lower the default or raise the cap")
    if not cfg.request_timeout_s > 0:  # written "not >" so that NaN is refused too
        raise Gpt2OnnxError(f"--request-timeout-s must be above 0, got {cfg.request_timeout_s}")
    if not cfg.shutdown_timeout_s >= 0:
        raise Gpt2OnnxError(f"--shutdown-timeout-s must be 0 or more, got {cfg.shutdown_timeout_s}")
    if cfg.api_key is not None and not cfg.api_key.strip():
        raise Gpt2OnnxError("the API key is empty; give a non-empty key or none")
    cfg.session.validate()
    replace(cfg.scheduler, capacity=None).validate(1 << 30)  # capacity against each model's context when it loads


def listen(cfg: ServeConfig) -> socket.socket:
    """A socket bound to cfg's host and port; one line naming the fix when it cannot be."""
    try:
        return socket.create_server((cfg.host, cfg.port))
    except OSError as e:  # a port in use, or a host that is not one of this machine's addresses
        fix = "choose another --port" if e.errno == errno.EADDRINUSE else "check --host (an address of this machine) and --port"
        why = os.strerror(e.errno) if e.errno else str(e)  # create_server's strerror adds "(while attempting to bind ...)"
        raise Gpt2OnnxError(f"cannot listen on {cfg.host}:{cfg.port}: {why}; {fix}") from None


def serve(artifacts: list[str], cfg: ServeConfig) -> None:
    import uvicorn

    check(cfg)
    sock = listen(cfg)  # bound here, so --port 0 can say which port it got
    models = load_models(artifacts, cfg)
    app = build_app(models, cfg)
    host, port = sock.getsockname()[:2]
    announce([m.name for m in models], [m.name for m in models if m.engine.manifest.synthetic], host, port, cfg)
    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # uvicorn waits for open connections before the app's own shutdown, and cancels their handlers at its
            # deadline (a plain-text 500, a stream cut mid-chunk). The schedulers drain from the start instead:
            # past shutdown_timeout_s they cancel what is left, whose handlers answer 503 (or end their stream
            # with an error event) within uvicorn's deadline, SHUTDOWN_GRACE_S later.
            app.state.server.drain()
            await super().shutdown(sockets)

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=cfg.shutdown_timeout_s + SHUTDOWN_GRACE_S,
                                   access_log=False))
    # uvicorn handles SIGTERM (graceful stop), then re-raises it under the handler it found; a no-op
    # one here makes a graceful stop exit 0 instead of dying by the signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
