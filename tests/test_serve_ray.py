"""Scale-out on Ray Serve, locally: ray.init(num_cpus=2), two synthetic:tiny replicas behind one
OpenAI-compatible ingress. Both serve; a conversation stays on one replica; when a replica is
killed its replacement comes up and no well-formed request is lost without a clear error."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
import ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(app, name: str, prefix: str, within_s: float = 180) -> None:
    """serve.run, but a deployment that cannot be placed fails the test instead of hanging CI."""
    import threading

    from ray import serve

    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(app, name=name, route_prefix=prefix)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(within_s)
    if t.is_alive():
        pytest.fail(f"Ray Serve did not deploy {name!r} within {within_s:g} s: {serve.status().applications.get(name)}")
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def ray_server(tiny_artifact):
    from ray import serve

    from gpt2onnx.runtime import SchedulerConfig
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.ray_app import application

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # half a CPU each: the two replicas and the autoscaling test's app fit the 2 CPUs Ray is given
    _deploy(application([tiny_artifact], ServeConfig(scheduler=SchedulerConfig(max_batch=4)), replicas=2, replica_cpus=0.5), "gpt2onnx", "/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _chat(base: str, messages: list[dict], model: str) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 4, "temperature": 0},
                      timeout=60)


def test_two_replicas_serve_and_conversations_stick(ray_server, tiny_artifact):
    import os

    from gpt2onnx.serve.ray_app import REPLICA_HEADER

    model = os.path.basename(tiny_artifact)
    seen: dict[str, set[str]] = {}
    # conversations go where the hash of their key and the replicas' (random) ids sends them: 8 all land on
    # one replica once in 128 runs (seen once), so go on until both served, up to 32 (once in 2^31)
    for conv in range(32):
        history = [{"role": "user", "content": f"conversation {conv} starts here"}]
        for _ in range(3):
            r = _chat(ray_server, history, model)
            assert r.status_code == 200, r.text
            seen.setdefault(str(conv), set()).add(r.headers[REPLICA_HEADER])
            history += [r.json()["choices"][0]["message"], {"role": "user", "content": "go on"}]
        if conv >= 7 and len(set().union(*seen.values())) == 2:
            break
    assert all(len(replicas) == 1 for replicas in seen.values()), seen  # every conversation stayed on its replica
    assert len(set().union(*seen.values())) == 2, seen  # and both replicas served
    models = httpx.get(ray_server + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [model]


def test_ingress_refuses_an_oversized_body_before_reading_it(ray_server):
    """The one ingress in front of every replica answers 413 on a body declared over the limit (1 MiB by
    default) at once, as the single server does: it neither waits for nor holds a gigabyte it will refuse."""
    host, port = ray_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000\r\n\r\n{\"prompt\": \"")  # and nothing more of its gigabyte
        reply = s.makefile("rb")
        status = reply.readline().decode()
        headers = dict(line.decode().lower().strip().split(": ", 1) for line in iter(reply.readline, b"\r\n"))
        body = json.loads(reply.read(int(headers["content-length"])))
    assert status.startswith("HTTP/1.1 413") and "over this server's limit" in body["error"]["message"], (status, body)


def test_killed_replica_is_replaced_and_requests_get_answers(ray_server, tiny_artifact):
    import os

    from ray import serve

    model = os.path.basename(tiny_artifact)
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Replica" in a["name"] and "Ingress" not in a["name"]]
    assert len(actors) == 2
    victim = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
    ray.kill(victim, no_restart=True)
    statuses = []
    for i in range(12):
        r = _chat(ray_server, [{"role": "user", "content": f"after the kill {i}"}], model)
        statuses.append(r.status_code)
        assert r.status_code == 200 or (r.status_code == 503 and "retry" in r.json()["error"]["message"]), r.text
    assert statuses.count(200) >= 6
    deadline = time.time() + 90
    while time.time() < deadline:
        app = serve.status().applications["gpt2onnx"]
        running = app.deployments["Replica"].replica_states.get("RUNNING", 0)
        if running == 2:
            break
        time.sleep(1)
    assert running == 2  # the replacement came up
    assert _chat(ray_server, [{"role": "user", "content": "and now"}], model).status_code == 200


def test_autoscaling_configuration_serves(ray_server, tiny_artifact):
    """The autoscaling form of the app (min 1, max 2 replicas) deploys and answers."""
    import os

    from ray import serve

    from gpt2onnx.runtime import SchedulerConfig
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.ray_app import application

    auto = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4}
    _deploy(application([tiny_artifact], ServeConfig(scheduler=SchedulerConfig(max_batch=4)), autoscaling=auto, replica_cpus=0.5), "auto", "/auto")
    try:
        r = httpx.post(ray_server + "/auto/v1/completions", json={"model": os.path.basename(tiny_artifact), "prompt": "hi",
                                                                "max_tokens": 3, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        replica = serve.status().applications["auto"].deployments["Replica"]
        assert replica.status == "HEALTHY" and sum(replica.replica_states.values()) >= 1
    finally:
        serve.delete("auto")


def test_the_ingress_relays_what_the_replica_app_answers(ray_server):
    """Every method reaches the replica's app (a DELETE got FastAPI's {"detail": ...}, uncounted), and the
    answer's headers come back whole (a redirect lost its Location)."""
    r = httpx.delete(ray_server + "/v1/models", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = httpx.get(ray_server + "/v1/models/", timeout=30)
    assert r.status_code == 307 and r.headers["location"].endswith("/v1/models"), (r.status_code, dict(r.headers))


def test_the_ingress_is_sized_for_every_replica_and_the_queue_is_bounded(tiny_artifact):
    """The one ingress ran Ray's default of 5 requests at once: the whole service's limit, whatever the
    replicas (3 of 8 streams waited ~10 s for a first token). A replica takes one more than its scheduler
    (which then answers 429 itself) and at most a replica's room waits at the ingress; past that Ray's
    BackPressureError is a 429 too, not an unbounded queue (a request past --request-timeout-s got its 200 after 16.8 s). The
    ingress outlives the replicas' shutdown deadline, to answer what they cut short."""
    from gpt2onnx.runtime import SchedulerConfig
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.ray_app import application

    cfg = ServeConfig(scheduler=SchedulerConfig(max_batch=4, max_queue=2), shutdown_timeout_s=7)
    for replicas, autoscaling, most in ((3, None, 3), (1, {"min_replicas": 1, "max_replicas": 5}, 5)):
        ingress = application([tiny_artifact], cfg, replicas=replicas, autoscaling=autoscaling)._bound_deployment
        replica = ingress.init_args[0]._bound_deployment
        i, r = ingress._deployment_config, replica._deployment_config
        assert (r.max_ongoing_requests, r.max_queued_requests) == (4 + 2 + 1, 4 + 2)
        assert i.max_ongoing_requests >= most * r.max_ongoing_requests + r.max_queued_requests + 8
        assert i.graceful_shutdown_timeout_s > r.graceful_shutdown_timeout_s == 7


def test_a_burst_within_what_the_replicas_take_is_served_not_refused(ray_server, tiny_artifact):
    """Ray counts a request as queued at the ingress while its router still picks a replica, so a queue bound
    of 1 refused bursts the replicas had room for: 6 requests at once on a max_batch 1 replica got five 429s.
    The bound is a replica's room now (what its scheduler runs and queues)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    model = os.path.basename(tiny_artifact)
    for _ in range(3):
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(lambda i: httpx.post(ray_server + "/v1/completions", json={
                "model": model, "prompt": f"burst {i}", "max_tokens": 8, "temperature": 0}, timeout=60).status_code, range(12)))
        assert codes == [200] * 12, codes


def test_replicas_freeze_their_heap_and_time_gc_pauses(ray_server, tiny_artifact):
    """A replica's app gets http scopes only, so the app's lifespan never ran there: no gc.freeze, and the
    GC-pause histogram stayed 0 whatever the replica did. ServerState.start runs in each replica now."""
    import os

    model = os.path.basename(tiny_artifact)
    for i in range(6):
        r = httpx.post(ray_server + "/v1/completions", json={"model": model, "prompt": f"gc {i}", "max_tokens": 16}, timeout=60)
        assert r.status_code == 200, r.text
    counts = []
    for _ in range(4):  # every replica's series (each sends them to the ingress every REPORT_S)
        text = httpx.get(ray_server + "/metrics", timeout=30).text
        counts.append(sum(float(line.split()[-1]) for line in text.splitlines()
                          if line.startswith("gpt2onnx_gc_pause_seconds_count")))
    assert max(counts) > 0, counts


def test_metrics_and_health_answer_for_every_replica(ray_server, tiny_artifact):
    """/metrics and /health at the ingress answered for whichever replica a request reached: a scrape
    alternated between two replicas' counters (Prometheus reads each drop as a counter reset), and /health
    said nothing of the other replica. Each replica reports both to the ingress now (every REPORT_S), and
    the ingress answers for all of them, each series labelled with its replica."""
    import os

    from prometheus_client.parser import text_string_to_metric_families

    from gpt2onnx.serve.ray_app import REPORT_S, STALE_S

    model = os.path.basename(tiny_artifact)

    def served() -> dict[str, float]:  # completions accepted, per replica, as /metrics says
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(httpx.get(ray_server + "/metrics", timeout=30).text):
            for s in fam.samples:
                if s.name == "gpt2onnx_http_requests_total" and s.labels.get("route") == "completions":
                    out[s.labels["replica"]] = out.get(s.labels["replica"], 0) + s.value
        return out

    deadline = time.monotonic() + STALE_S + 4 * REPORT_S  # a replica replaced earlier in this module leaves within STALE_S
    while len(before := served()) != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(before) == 2, before
    time.sleep(2 * REPORT_S)  # the earlier tests' requests are in the replicas' next reports
    before = served()
    for i in range(8):
        r = httpx.post(ray_server + "/v1/completions", json={"model": model, "prompt": f"count {i}", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 4 * REPORT_S
    while sum((after := served()).values()) - sum(before.values()) != 8 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sorted(after) == sorted(before) and sum(after.values()) - sum(before.values()) == 8, (before, after)
    h = httpx.get(ray_server + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok", h.text
    assert sorted(h.json()["replicas"]) == sorted(after), h.text
    assert all(v["status"] == "ok" and model in v["models"] for v in h.json()["replicas"].values()), h.text
    assert httpx.head(ray_server + "/health", timeout=30).status_code == 200
