"""Scale-out on Ray Serve: N replicas, each an engine and scheduler per artifact behind the same
OpenAI routes, and one ingress that routes each conversation to the replica holding its cache.

    gpt2onnx serve ARTIFACT --ray --replicas 2            # or, from Python:
    from gpt2onnx.serve.ray_app import application
    serve.run(application(["artifacts/dialogpt-small-int8"], ServeConfig(), replicas=2))

Routing. A chat conversation's KV cache lives in the replica that served its last turn, so every
turn must reach the same replica. The ingress tags each request with a conversation key (carried
as Ray Serve's multiplexed model id) and the Replica deployment uses a custom request router
(Ray Serve's RequestRouter API): rendezvous hashing of the key over the running replicas, so a key
always ranks the same replica first while it lives, and only the conversations of a replica that
goes away move. (Ray's own multiplexed routing was tried first: it learns which replica holds an id
from reports that lag by seconds, so back-to-back turns of one conversation landed on both
replicas.) The key is the client's `X-Conversation-Id` header when given, else a hash of the model,
the `user` field and the conversation's first turn (stable as the conversation grows). Requests
without a key (completions) go to whichever replica Ray's default ranking picks.

Each replica runs the app of app.py in-process (ASGI), so the routes, validation and errors are
the single server's exactly; the ingress forwards method, path, headers and body and streams the
answer back. A replica that dies is replaced by Ray; requests it held fail with a 503 that says so.
`/metrics` and `/health` are the ingress's own: every replica's, from what each reports (`report`).

`gpt2onnx serve --ray` behaves like the plain server: the same start line naming the models, warnings
only (no per-request access log from the ingress or the replicas), and on SIGTERM or Ctrl-C it stops
taking requests, lets in-flight ones finish for `shutdown_timeout_s`, and exits 0.
"""


import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request  # module level: FastAPI resolves the routes' annotations here
from fastapi.responses import Response, StreamingResponse

from .config import ServeConfig
from .metrics import CONTENT_TYPE_LATEST as METRICS_TYPE

try:  # the router base class exists in the ray extra only; the rest of this module needs it too
    from ray.serve.request_router import RequestRouter
except ImportError:  # pragma: no cover - gpt2onnx[ray] not installed: the CLI says which extra to install
    RequestRouter = object

# the plain server logs warnings only and no access log (uvicorn's log_level="warning", access_log=False)
QUIET = {"log_level": "WARNING", "enable_access_log": False}
CONVERSATION_HEADER = "x-conversation-id"
REPLICA_HEADER = "x-gpt2onnx-replica"  # which replica answered (tests, debugging)
INGRESS_SPARE = 32  # requests the ingress takes beyond what the replicas run and queue: /health, /metrics, 429s
HOP_BY_HOP = ("content-length", "transfer-encoding", "connection", "keep-alive")  # the ingress's own response sets these
# A Serve handle reaches some replica, never a chosen one, so the ingress cannot ask each for its /metrics or
# /health: each replica sends them every REPORT_S instead, and the ingress answers for all of them (each series
# labelled with its replica, as Ray's own metrics are); a replica not heard from for STALE_S (killed, scaled
# down) leaves the answer
REPORT_S = 2.0
STALE_S = 10.0
DRAINED_LINGER_S = 1.0  # after the drain, the ingress answers 503 this long before the route goes (serve --ray)


def conversation_key(path: str, headers: dict[str, str], body: bytes) -> str | None:
    """The key that pins a chat conversation to a replica, or None (no affinity needed)."""
    if given := headers.get(CONVERSATION_HEADER):
        return given[:200]
    if not path.endswith("/chat/completions"):
        return None
    try:
        data = json.loads(body)
        turns = [m for m in data.get("messages", []) if m.get("role") in ("user", "assistant")]
        first = turns[0].get("content") or ""
        basis = json.dumps([data.get("model"), data.get("user"), first])
    except (ValueError, AttributeError, IndexError, TypeError):
        return None  # the replica will refuse the body with a proper 400
    return hashlib.sha256(basis.encode()).hexdigest()[:32]


class ConversationRouter(RequestRouter):
    """Rendezvous hashing: a request with a conversation key goes to the replica whose hash with
    the key ranks first (then the next, if it is full); requests without a key to any replica."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not key:
            return [list(candidate_replicas)]
        ranked = sorted(candidate_replicas, key=lambda r: hashlib.sha256(f"{key}/{r.replica_id.unique_id}".encode()).digest())
        return [[r] for r in ranked]


def application(artifacts: list[str], cfg: ServeConfig, replicas: int = 2, autoscaling: dict | None = None,
                replica_cpus: float = 1.0):
    """The Ray Serve application: `serve.run(application(...))`. `autoscaling` (Ray's
    autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16})
    replaces the fixed replica count. `replica_cpus` is what Ray reserves per replica: match it to
    the engine's threads on a real cluster; fractions let several replicas share a small machine."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig
    from ray.serve.exceptions import BackPressureError

    from .errors import APIError
    from .protocol import error_body
    from .server import SHUTDOWN_GRACE_S
    from .serving import capped_body
    from .streaming import SHUT_DOWN, sse

    room = cfg.scheduler.max_batch + cfg.scheduler.max_queue  # what a replica's scheduler runs and queues
    most = (autoscaling or {}).get("max_replicas", replicas)

    # one more than the scheduler takes, so the scheduler itself answers the next with its 429 (and Retry-After).
    # Ray counts a request as queued at the ingress from its arrival until its router has picked a replica, so the
    # queue bound is a replica's room, not 1 (which refused bursts the replicas had room for); past it Ray raises
    # BackPressureError: a 429 too, not an unbounded queue
    @serve.deployment(num_replicas=None if autoscaling else replicas, autoscaling_config=autoscaling,
                      max_ongoing_requests=room + 1, max_queued_requests=room, health_check_period_s=2, health_check_timeout_s=10,
                      request_router_config=RequestRouterConfig(request_router_class=ConversationRouter),
                      ray_actor_options={"num_cpus": replica_cpus}, logging_config=QUIET,
                      graceful_shutdown_timeout_s=cfg.shutdown_timeout_s)
    class Replica:
        def __init__(self, artifacts: list[str], cfg: ServeConfig):
            from .access import configure
            from .app import build_app
            from .server import load_models

            configure(cfg.access_log)  # into the replica's log (Ray's log directory)
            self.models = load_models(artifacts, cfg)
            self.app = build_app(self.models, cfg)
            self.app.state.server.start()  # forward() sends http scopes only: the app's lifespan never runs here
            context = serve.get_replica_context()
            self.replica_id = context.replica_tag
            self.reporting = threading.Event()  # set: stop reporting
            threading.Thread(target=report, args=(self.app.state.server, self.replica_id, context.app_name, self.reporting),
                             name="gpt2onnx-report", daemon=True).start()

        async def forward(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> AsyncIterator:
            """Run one HTTP request through the app; yields (status, headers), then body chunks."""
            scope = {"type": "http", "http_version": "1.1", "method": method, "path": path, "raw_path": path.encode(),
                     "query_string": b"", "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
                     "scheme": "http", "root_path": ""}
            import asyncio

            out: asyncio.Queue = asyncio.Queue()
            sent = False

            async def receive():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.Event().wait()  # the ingress hangs up by cancelling this generator
                return {"type": "http.disconnect"}

            async def send(msg):
                await out.put(msg)

            task = asyncio.ensure_future(self.app(scope, receive, send))
            try:
                while True:
                    msg = await out.get()
                    if msg["type"] == "http.response.start":
                        headers = [(k.decode(), v.decode()) for k, v in msg.get("headers", [])]
                        yield (msg["status"], headers + [(REPLICA_HEADER, self.replica_id)])
                    elif msg["type"] == "http.response.body":
                        if msg.get("body"):
                            yield msg["body"]
                        if not msg.get("more_body"):
                            break
            finally:
                if not task.done():
                    task.cancel()

        def __del__(self) -> None:
            """Ray Serve's shutdown hook (after in-flight requests drained): stop the schedulers' threads."""
            if hasattr(self, "reporting"):
                self.reporting.set()
            for m in getattr(self, "models", []):
                m.scheduler.close(cancel=True)
            if hasattr(self, "app"):
                self.app.state.server.stop()

        def check_health(self) -> None:
            for m in self.models:
                if not m.scheduler.thread.is_alive():
                    raise RuntimeError(f"the scheduler of {m.name} stopped")
                if m.scheduler.health:  # its engine fails every pass: Ray replaces the replica
                    raise RuntimeError(f"the scheduler of {m.name} is failing: {m.scheduler.health}")

    ingress_app = FastAPI(docs_url=None, redoc_url=None)

    # one ingress in front of every replica: Ray's default of 5 requests at once would be the whole service's
    # limit; it outlives the replicas' shutdown deadline by SHUTDOWN_GRACE_S, so what they cut short is answered
    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0},  # it forwards bytes; the replicas compute
                      max_ongoing_requests=most * (room + 1) + room + INGRESS_SPARE, logging_config=QUIET,
                      graceful_shutdown_timeout_s=cfg.shutdown_timeout_s + SHUTDOWN_GRACE_S)
    @serve.ingress(ingress_app)
    class Ingress:
        def __init__(self, replica):
            self.replica = replica
            self.draining = False
            self.inflight: set = set()  # the replica calls still answering (their response generators)
            self.reports: dict[str, tuple[float, str, int, dict]] = {}  # replica -> (when, /metrics text, /health status, body)

        async def report(self, replica: str, metrics: str, status: int, health: dict) -> None:
            """A replica's latest /metrics text and /health (its reporter thread calls this every REPORT_S)."""
            self.reports[replica] = (time.monotonic(), metrics, status, health)

        def fresh(self) -> dict[str, tuple[float, str, int, dict]]:
            """The reports of replicas heard from within STALE_S; the others are forgotten."""
            now = time.monotonic()
            for gone in [k for k, r in self.reports.items() if now - r[0] > STALE_S]:
                del self.reports[gone]
            return self.reports

        async def drain(self, timeout_s: float) -> int:
            """Shutdown's first step (run() calls it before serve.delete, which removes the route at once: Ray's
            proxy then answers 404, which clients do not retry): new requests get the plain server's 503 with
            Retry-After; in-flight ones run for up to `timeout_s`, then are cancelled (a 503, or a stream's error
            event). Returns how many were cancelled."""
            self.draining = True
            deadline = time.monotonic() + timeout_s
            while self.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            cut = list(self.inflight)
            for gen in cut:
                gen.cancel()
            deadline = time.monotonic() + SHUTDOWN_GRACE_S  # for their handlers to answer
            while self.inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return len(cut)

        def failed(self, e: BaseException, what: str) -> APIError:
            """The 503 for a replica call that ended in `e`: the shutdown's words when drain() cut it; a
            cancellation that drain() did not make (the client left) goes on up."""
            if isinstance(e, asyncio.CancelledError) and not self.draining:
                raise e
            why = SHUT_DOWN if self.draining else f"{what} ({type(e).__name__}); retry"
            return APIError(503, why, "server_error", retry_after=cfg.retry_after_s)

        # every method: the replica's app answers what it does not route (405) in OpenAI's error shape
        @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
        async def route(self, path: str, request: Request):
            if self.draining:  # /health too: a load balancer stops sending here
                return APIError(503, SHUT_DOWN, "server_error", retry_after=cfg.retry_after_s).response()
            if path == "metrics" and request.method == "GET":  # every replica's series
                return Response(merged_metrics({k: r[1] for k, r in self.fresh().items()}), media_type=METRICS_TYPE)
            if path == "health" and request.method in ("GET", "HEAD") and self.fresh():  # none yet: a replica answers
                ok = any(r[2] == 200 for r in self.reports.values())  # one replica that serves: the service serves
                body = {"status": "ok" if ok else "error", "replicas": {k: r[3] for k, r in sorted(self.reports.items())}}
                return Response(json.dumps(body).encode() if request.method == "GET" else b"", status_code=200 if ok else 503,
                                media_type="application/json")
            try:  # one ingress serves every replica: it must not hold (or wait for) an oversized body whole
                body = await capped_body(request, cfg.max_body_bytes)
            except APIError as e:
                return e.response()
            headers = {k.lower(): v for k, v in request.headers.items()}
            key = conversation_key("/" + path, headers, body)
            handle = self.replica.options(stream=True, **({"multiplexed_model_id": key} if key else {}))
            gen = handle.forward.remote(request.method, "/" + path, [(k.encode(), v.encode()) for k, v in request.headers.items()], body)
            self.inflight.add(gen)
            streaming = False
            try:
                try:
                    status, resp_headers = await gen.__anext__()
                except BackPressureError:  # every replica is full and one more waits here already: the plain server's 429
                    return APIError(429, "every replica is busy and the queue is full; retry later", "rate_limit_error",
                                    code="queue_full", retry_after=cfg.retry_after_s).response()
                except (Exception, asyncio.CancelledError) as e:  # a replica that died or is restarting, or cut by drain()
                    return self.failed(e, "no replica could take the request").response()
                media = dict(resp_headers).get("content-type", "application/json")
                if media.startswith("text/event-stream"):
                    async def chunks():
                        try:
                            async for c in gen:
                                yield c
                        except (Exception, asyncio.CancelledError) as e:  # the replica died mid-stream, or drain() cut it
                            why = self.failed(e, "the replica failed mid-stream").message
                            yield sse(error_body(why, "server_error"))
                            yield b"data: [DONE]\n\n"
                        finally:
                            self.inflight.discard(gen)

                    streaming = True
                    return StreamingResponse(chunks(), status_code=status, media_type="text/event-stream",
                                             headers={REPLICA_HEADER: dict(resp_headers).get(REPLICA_HEADER, "")})
                try:
                    content = b"".join([c async for c in gen])
                except (Exception, asyncio.CancelledError) as e:  # noqa: BLE001
                    return self.failed(e, "the replica failed").response()
                keep = {k: v for k, v in resp_headers if k.lower() not in HOP_BY_HOP}  # Location, Allow, Retry-After ...
                return Response(content, status_code=status, headers=keep)
            finally:
                if not streaming:  # a stream leaves the set when its body ends
                    self.inflight.discard(gen)

    return Ingress.bind(Replica.bind(artifacts, cfg))


def report(server, replica: str, app_name: str, stop: threading.Event) -> None:
    """A replica's reporter thread: its /metrics text and /health to the ingress now and every REPORT_S until
    `stop` (a failed call, the ingress not up yet or gone, is tried again next time)."""
    from ray import serve

    from .app import health_report

    ingress = None
    while True:
        try:
            ingress = ingress or serve.get_deployment_handle("Ingress", app_name)
            status, body = health_report(server)
            ingress.report.remote(replica, server.metrics.render()[0].decode(), status, body)
        except Exception:  # noqa: BLE001 - metrics are best effort; serving goes on
            pass
        if stop.wait(REPORT_S):
            return


def merged_metrics(texts: dict[str, str]) -> bytes:
    """Replicas' /metrics texts (replica -> text) as one exposition, each sample labelled with its replica:
    a counter summed over replicas would drop whenever one goes away, which Prometheus reads as a reset."""
    from prometheus_client import generate_latest
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            into = families.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type, fam.unit))
            into.samples += [x._replace(labels={**x.labels, "replica": replica}) for x in fam.samples]

    class Merged:
        def collect(self):
            return iter(families.values())

    return generate_latest(Merged())


def run(artifacts: list[str], cfg: ServeConfig, replicas: int) -> None:
    """`gpt2onnx serve --ray`: start a local Ray (or join RAY_ADDRESS) and serve until SIGTERM or
    Ctrl-C, then shut Serve down (draining in-flight requests) and return."""
    import logging
    import os
    import signal
    import sys

    import ray
    from ray import serve

    from gpt2onnx.runtime import load_manifest

    from .server import SHUTDOWN_GRACE_S, announce, listen, model_names

    names = model_names(artifacts)
    synthetic = [n for n, a in zip(names, artifacts) if load_manifest(a, verify="size").synthetic]  # a bad path fails here, before Ray starts
    with listen(cfg) as s:  # a port in use is refused in one line here (Ray's proxy fails with a traceback); --port 0 picks one
        port = s.getsockname()[1]
    # warnings only, as the plain server: Ray's and Serve's INFO lines in this process, and the workers'
    # output (the raylet's notes on the controller it kills at shutdown) stays in Ray's log directory
    ray.init(ignore_reinit_error=True, logging_level=logging.WARNING, log_to_driver=False)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # ray.init installs a SIGTERM handler that raises SystemExit out of whatever runs (a traceback from
    # atexit's ray.shutdown); ours only asks the loop below to stop
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    gcs = ray.get_runtime_context().gcs_address
    failed: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.start(http_options={"host": cfg.host, "port": port}, logging_config=QUIET)
            serve.run(application(artifacts, cfg, replicas), name="gpt2onnx", route_prefix="/")
        except BaseException as e:  # noqa: BLE001 - raised again on the main thread
            failed.append(e)

    # deploying waits on the GCS as well: a signal that stopped Ray's processes mid-start would hang it
    starting = threading.Thread(target=deploy, daemon=True)
    starting.start()
    watch(lambda: stop.is_set() or not starting.is_alive(), gcs, stop)
    if failed:
        raise failed[0]
    if not stop.is_set():
        announce(names, synthetic, cfg.host, port, cfg, how=f"{replicas} Ray Serve replica{'s' if replicas > 1 else ''}")
        watch(stop.is_set, gcs, stop)
    # the ingress drains (503 to new requests, in-flight ones finish for shutdown_timeout_s), then the
    # application is deleted; a Ray this process started goes with it (serve.shutdown would first have the
    # raylet report the controller it kills as a failed task), a cluster it joined (RAY_ADDRESS) loses only Serve
    def stop_serving() -> None:
        try:  # new requests get 503 while in-flight ones finish (serve.delete alone removes the route: Ray's 404)
            serve.get_app_handle("gpt2onnx").drain.remote(cfg.shutdown_timeout_s).result(
                timeout_s=cfg.shutdown_timeout_s + 2 * SHUTDOWN_GRACE_S)
            # the route stays a while answering 503 (retried elsewhere) before the delete makes it Ray's 404 (not
            # retried): with nothing in flight the drain returns at once, and a request sent just after the signal
            # met the 404 (1 in 7 runs of the CLI test)
            time.sleep(DRAINED_LINGER_S)
        except Exception as e:  # noqa: BLE001 - the ingress is gone or stuck: the delete below still stops what is left
            print(f"gpt2onnx: the ingress did not drain ({type(e).__name__}: {str(e)[:200]}); stopping anyway",
                  file=sys.stderr, flush=True)
        serve.delete("gpt2onnx")

    draining = threading.Thread(target=stop_serving, daemon=True)
    draining.start()
    watch(lambda: not draining.is_alive(), gcs, stop)
    if os.environ.get("RAY_ADDRESS"):
        serve.shutdown()
    ray.shutdown()


def watch(done, gcs: str, stop) -> None:
    """Wait until `done()`, checking every half second that Ray's GCS still answers. Ray's client waits a
    minute on a GCS that is gone, then aborts the process with a C++ error (exit 1); instead leave at once
    with one line: after our SIGTERM (the same signal reached Ray's processes: it was sent to the whole
    process group or cgroup, systemd's default KillMode) exit 0, otherwise (the cluster went away under
    us: no route answers) exit 1 for a supervisor to restart."""
    import os
    import sys

    while not done():
        time.sleep(0.5)
        if done() or gcs_reachable(gcs):
            continue
        if stop.is_set():
            why = ("Ray's processes were stopped by the same signal (sent to the whole process group or cgroup); requests "
                   "in flight were cut: under systemd set KillMode=mixed so they can finish")
        else:
            why = f"Ray's GCS at {gcs} stopped answering; no request can be served"
        print(f"gpt2onnx: {why}; exiting", file=sys.stderr, flush=True)
        end_children()  # the raylet's agents outlive it otherwise, orphaned
        os._exit(0 if stop.is_set() else 1)  # not sys.exit: atexit's ray.shutdown would wait on the GCS too


def end_children(grace_s: float = 3.0) -> None:
    """Stop the processes this one started (a local Ray's raylet, its workers and agents): SIGTERM, then
    SIGKILL what is left after `grace_s`. A cluster joined through RAY_ADDRESS runs none here."""
    import psutil

    kids = psutil.Process().children(recursive=True)
    for k in kids:
        try:
            k.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(kids, timeout=grace_s)
    for k in alive:
        try:
            k.kill()
        except psutil.Error:
            pass


def gcs_reachable(address: str, timeout_s: float = 0.5) -> bool:
    """Whether Ray's GCS (host:port) accepts a connection: a stopped head refuses at once."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
        return True
    except OSError:
        return False
