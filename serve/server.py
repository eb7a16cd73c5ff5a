"""`gpt2onnx serve`: load the artifacts, start one scheduler each, serve HTTP with uvicorn.

SIGTERM / Ctrl-C / SIGHUP: uvicorn stops accepting connections, the schedulers finish what they hold for up to
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

from .access import configure
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
    if not cfg.keep_alive_s > 0:
        raise Gpt2OnnxError(f"--keep-alive-s must be above 0, got {cfg.keep_alive_s}")
    if cfg.root_path and (not cfg.root_path.startswith("/") or cfg.root_path.endswith("/")):
        raise Gpt2OnnxError(f"--root-path must start with / and not end with one (e.g. /llm), got {cfg.root_path!r}")
    if not cfg.shutdown_timeout_s >= 0:
        raise Gpt2OnnxError(f"--shutdown-timeout-s must be 0 or more, got {cfg.shutdown_timeout_s}")
    if cfg.api_key is not None and not cfg.api_key.strip():
        raise Gpt2OnnxError("the API key is empty; give a non-empty key or none")
    if cfg.api_key is not None and any(c.isspace() or not c.isprintable() for c in cfg.api_key):
        raise Gpt2OnnxError("the API key holds spaces or control characters, which an 'Authorization: Bearer KEY' header "
                            "cannot carry; use printable characters only")
    cfg.session.validate()
    replace(cfg.scheduler, capacity=None).validate(1 << 30)  # capacity against each model's context when it loads


def listen(cfg: ServeConfig) -> socket.socket:
    """A socket bound to cfg's host and port but not listening yet: uvicorn listens on it once the models
    are loaded, so until then a connection is refused (a TCP probe fails, a client tries elsewhere) rather
    than accepted and left waiting. One line naming the fix when it cannot be bound."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:  # a host name that does not resolve
        raise Gpt2OnnxError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}; check --host (an address of this machine)") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own: a restart need not wait out TIME_WAIT
        sock.bind(addr)
    except OSError as e:  # a port in use, or a host that is not one of this machine's addresses
        sock.close()
        fix = "choose another --port" if e.errno == errno.EADDRINUSE else "check --host (an address of this machine) and --port"
        why = os.strerror(e.errno) if e.errno else str(e)
        raise Gpt2OnnxError(f"cannot listen on {cfg.host}:{cfg.port}: {why}; {fix}") from None
    return sock


def serve(artifacts: list[str], cfg: ServeConfig) -> None:
    import uvicorn

    check(cfg)
    configure(cfg.access_log)
    sock = listen(cfg)  # bound here, so --port 0 can say which port it got
    models = load_models(artifacts, cfg)
    app = build_app(models, cfg)
    host, port = sock.getsockname()[:2]

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if not self.should_exit:  # listening now: the start line means the server answers
                announce([m.name for m in models], [m.name for m in models if m.engine.manifest.synthetic], host, port, cfg)

        async def shutdown(self, sockets=None):
            # uvicorn waits for open connections before the app's own shutdown, and cancels their handlers at its
            # deadline (a plain-text 500, a stream cut mid-chunk). The schedulers drain from the start instead:
            # past shutdown_timeout_s they cancel what is left, whose handlers answer 503 (or end their stream
            # with an error event) within uvicorn's deadline, SHUTDOWN_GRACE_S later.
            app.state.server.drain()
            await super().shutdown(sockets)

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=cfg.shutdown_timeout_s + SHUTDOWN_GRACE_S,
                                   access_log=False, timeout_keep_alive=cfg.keep_alive_s, root_path=cfg.root_path))
    # uvicorn handles SIGTERM and SIGINT (graceful stop), then re-raises the signal under the handler it found;
    # no-op ones here make a graceful stop exit 0 (not death by the signal, nor "interrupted" and 130). SIGHUP (a
    # closed terminal, a supervisor's stop) stops as gracefully: it killed the server mid-stream
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    signal.signal(signal.SIGHUP, server.handle_exit)
    server.run(sockets=[sock])
