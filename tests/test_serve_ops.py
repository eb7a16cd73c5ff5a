"""What an operator running `gpt2onnx serve` behind a load balancer or in Kubernetes relies on: /health
that fails when the server cannot serve, logs of server errors, request ids carried through, the API key
from the environment read safely, signals, and the port refusing connections until the models are loaded.
In-process (FastAPI's TestClient) on synthetic:tiny, or the CLI as a process where signals are the point."""

from __future__ import annotations

import os
import time

import pytest
from fastapi.testclient import TestClient


def _app(tiny_artifact, **kw):
    from gpt2onnx.serve.app import build_app
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.server import load_models

    cfg = ServeConfig(**kw)
    return build_app(load_models([tiny_artifact], cfg), cfg)


class Fatal(BaseException):
    """Not an Exception: what no handler of the loop is meant to absorb."""


def test_a_failed_slot_reset_fails_its_requests_and_the_loop_goes_on(tiny_artifact):
    """An error while admitting a request (a slot's cache reset) escaped the scheduler's loop and ended its
    thread: every later request waited for its timeout (504) while /health said ok. Now that admission fails
    like a failed step, the next request is served; a loop that stops for good makes /health a 503 and every
    request a 503 at once."""
    app = _app(tiny_artifact, request_timeout_s=20)
    model = os.path.basename(tiny_artifact)
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    with TestClient(app, raise_server_exceptions=False) as c:
        sched = app.state.server.models[model].scheduler
        truncate = sched.kv.truncate

        def once(*a):
            sched.kv.truncate = truncate
            raise RuntimeError("row 0 cannot be reset")

        sched.kv.truncate = once
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 500 and "row 0 cannot be reset" in r.json()["error"]["message"], r.text
        assert c.post("/v1/completions", json=body).status_code == 200
        assert c.get("/health").status_code == 200

        def fatal():
            raise Fatal("the loop cannot go on")

        sched._step = fatal
        r = c.post("/v1/completions", json=body)  # the request running then fails with the loop
        assert r.status_code == 500 and "the loop cannot go on" in r.text, r.text
        sched.thread.join(10)
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "error", h.text
        assert "the loop cannot go on" in h.json()["errors"][model], h.text
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503 and "the scheduler stopped" in r.json()["error"]["message"], r.text
        assert c.head("/health").status_code == 503


def test_the_port_refuses_connections_until_the_models_are_loaded():
    """The socket was listening from before the models loaded: a Kubernetes tcpSocket probe passed and clients
    hung for seconds on a server that could not answer. It is bound (a port in use is refused at once, --port 0
    knows its number) but refuses connections until uvicorn listens, after the load (as vLLM's)."""
    import socket

    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.server import listen

    with listen(ServeConfig(port=0)) as s:
        port = s.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        s.listen()
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_an_unknown_host_name_is_one_plain_line():
    from gpt2onnx.runtime import Gpt2OnnxError
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.server import listen

    with pytest.raises(Gpt2OnnxError) as e:
        listen(ServeConfig(host="nosuchhost.invalid", port=0))
    assert "Unknown error" not in str(e.value) and "check --host" in str(e.value), e.value


def test_the_api_key_from_the_environment_is_read_safely(tiny_artifact):
    """GPT2ONNX_API_KEY set to nothing served every route without a key (an empty --api-key was refused); a key
    from a secret file (kubectl's --from-file keeps the newline) locked every client out with 401; a Bearer
    header with two spaces was refused; a 401 had no WWW-Authenticate."""
    from gpt2onnx.cli import api_key
    from gpt2onnx.runtime import Gpt2OnnxError
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.server import check

    for flag, env in (("", None), (None, ""), (None, " \n")):
        with pytest.raises(Gpt2OnnxError, match="the API key is empty"):
            api_key(flag, env)
    assert api_key(None, None) is None
    assert api_key(None, "s3cret\n") == "s3cret" and api_key("k1", "k2") == "k1"
    with pytest.raises(Gpt2OnnxError, match="spaces or control characters"):
        check(ServeConfig(api_key="two words"))
    app = _app(tiny_artifact, api_key="s3cret")
    with TestClient(app) as c:
        for header in ("Bearer s3cret", "bearer  s3cret", "Bearer\ts3cret"):
            assert c.get("/v1/models", headers={"Authorization": header}).status_code == 200, header
        r = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.headers


def test_request_ids_errors_in_the_log_and_streamed_errors_counted(tiny_artifact, caplog):
    """A gateway's X-Request-Id was dropped (the body's id a fresh uuid, no header back), an engine failure
    answered 500 with nothing in the server's log, and a stream's error (its 200 already sent) was not counted
    in gpt2onnx_http_errors_total. Now the id comes back (header, and the completion's id built on it, as
    vLLM's), every 5xx but a shutdown's 503 is one log line with it, streamed ones counted by their status."""
    import logging

    app = _app(tiny_artifact)
    model = os.path.basename(tiny_artifact)
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-42"})
        assert r.headers["x-request-id"] == "trace-42" and r.json()["id"] == "cmpl-trace-42", (r.headers, r.text)
        r = c.post("/v1/completions", json=body, headers={"X-Request-Id": "no spaces allowed\x01"})  # not usable: a fresh one
        rid = r.headers["x-request-id"]
        assert len(rid) == 32 and r.json()["id"] == f"cmpl-{rid}"
        assert c.get("/nowhere").headers["x-request-id"]  # errors carry it too

        sched = app.state.server.models[model].scheduler
        step = sched._step

        def broken():
            raise RuntimeError("onnxruntime failed")

        sched._step = broken
        with caplog.at_level(logging.WARNING, logger="gpt2onnx"):
            r = c.post("/v1/completions", json=body, headers={"X-Request-Id": "t-500"})
            assert r.status_code == 500
            s = c.post("/v1/completions", json={**body, "stream": True}, headers={"X-Request-Id": "t-stream"})
            assert s.status_code == 200 and "onnxruntime failed" in s.text and s.text.endswith("data: [DONE]\n\n")
            assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        sched._step = step
        lines = [rec.getMessage() for rec in caplog.records]
        assert any("POST /v1/completions 500 request_id=t-500" in ln and "onnxruntime failed" in ln for ln in lines), lines
        assert any("500 request_id=t-stream" in ln for ln in lines), lines
        assert len(lines) == 2, lines  # a client's 404 is not the server's error
        metrics = c.get("/metrics").text
        assert 'gpt2onnx_http_errors_total{status="500"} 2.0' in metrics, metrics


def test_an_engine_that_fails_every_pass_fails_the_health_check_until_a_pass_runs(tiny_artifact, caplog, monkeypatch):
    """A scheduler whose every pass failed answered each request with a 500 while /health said ok: a load
    balancer kept sending it its share and a liveness probe never restarted it (after a sticky CUDA error
    every later launch fails). FAILING_TURNS failed turns in a row make /health a 503 naming the error, and
    Ray's health check fail; one failure does not. It ends with the first pass that runs: a request's, or,
    as a load balancer that reads /health as readiness sends none, the idle scheduler's own probe."""
    import logging

    from gpt2onnx.runtime import scheduler as mod

    monkeypatch.setattr(mod, "PROBE_S", 0.2)
    app = _app(tiny_artifact)
    model = os.path.basename(tiny_artifact)
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level(logging.WARNING, logger="gpt2onnx"):
        sched = app.state.server.models[model].scheduler
        prefill = sched.kv.prefill
        calls = []

        def broken(*a, **k):
            calls.append(a)
            raise RuntimeError("CUDA failure 700: an illegal memory access was encountered")

        sched.kv.prefill = broken
        for i in range(mod.FAILING_TURNS):
            h = c.get("/health")
            assert h.status_code == 200 and sched.health is None, (i, h.text)  # fewer failures than that: still serving
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 500 and "illegal memory access" in r.json()["error"]["message"], r.text
        n = len(calls)
        time.sleep(1.0)  # idle: its probes run and fail
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "error", h.text
        assert "turns failed" in h.json()["errors"][model] and "illegal memory access" in h.json()["errors"][model], h.text
        assert len(calls) > n, "the idle scheduler did not probe its engine"
        sched.kv.prefill = prefill  # the engine works again; no request comes: the next probe finds it
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        h = c.get("/health")
        assert h.status_code == 200 and sched.health is None, h.text
        assert not any(s.tokens for s in sched.slots) and not sched.kv.held.any(), sched.kv.held  # the probe's row emptied
        assert c.post("/v1/completions", json=body).status_code == 200
    lines = [rec.getMessage() for rec in caplog.records]
    assert any("scheduler is failing" in ln for ln in lines) and any("run again" in ln for ln in lines), lines


def test_access_log_head_allow_cors_and_proxy_settings(tiny_artifact, caplog):
    import logging

    from gpt2onnx.runtime import Gpt2OnnxError
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.server import check

    app = _app(tiny_artifact, allowed_origins="https://ui.example")
    with TestClient(app) as c, caplog.at_level(logging.INFO, logger="gpt2onnx"):
        r = c.get("/health", headers={"X-Request-Id": "probe-1"})
        assert r.status_code == 200 and c.head("/health").status_code == 200
        r = c.get("/v1/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers  # RFC 9110: a 405 names the methods
        pre = c.options("/v1/completions", headers={"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://ui.example", pre.headers
        r = c.get("/v1/models", headers={"Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in r.headers
    assert any('"GET /health" 200' in rec.getMessage() and "request_id=probe-1" in rec.getMessage() for rec in caplog.records)
    for bad, needle in ((dict(keep_alive_s=0), "--keep-alive-s"), (dict(root_path="llm"), "--root-path"),
                        (dict(root_path="/llm/"), "--root-path")):
        with pytest.raises(Gpt2OnnxError, match=needle):
            check(ServeConfig(**bad))
    check(ServeConfig(root_path="/llm", keep_alive_s=65))


def test_a_stream_nobody_reads_is_cut_at_its_deadline(engine):
    """The deadline was checked only while the stream waited for a token: one whose client stopped reading sat
    in its send, so its 16 rows decoded on past --request-timeout-s (47 s with a 10 s timeout, in an audit)."""
    import asyncio
    from types import SimpleNamespace

    from gpt2onnx.runtime import Scheduler, SchedulerConfig
    from gpt2onnx.serve.metrics import Metrics
    from gpt2onnx.serve.streaming import events

    shape = SimpleNamespace(chunk=lambda choices, **kw: {"choices": choices, **kw}, token_chunk=lambda i, tok: {"i": i},
                            final_chunk=lambda i, res: {"i": i, "end": res.finish_reason},
                            body=SimpleNamespace(include_usage=False), server=SimpleNamespace(metrics=Metrics([])),
                            request=SimpleNamespace(scope={"method": "POST", "path": "/v1/completions"}))
    with Scheduler(engine, SchedulerConfig(max_batch=2)) as sched:
        step = sched._step

        def slow_step():  # a model whose 120 tokens take ~1.2 s, past the 0.3 s deadline on any machine
            time.sleep(0.01)
            step()

        sched._step = slow_step
        handles = [sched.submit([15496, 11, i], max_new_tokens=120, eos_token_id=-1) for i in range(2)]

        async def reader_that_stops() -> list[bytes]:
            stream = events(handles, shape, 0.3, lambda r: None)
            first = await stream.__anext__()  # then the client reads nothing more: its send would block here
            await asyncio.sleep(1.0)
            ends.extend(h.request.finish_reason for h in handles)  # while nobody reads
            rest = [c async for c in stream]
            return [first, *rest]

        ends: list = []
        chunks = asyncio.run(reader_that_stops())
        assert ends == ["cancelled", "cancelled"], ends
        assert all(len(h.request.tokens) < 120 for h in handles)
        assert b"did not finish within 0.3 s" in b"".join(chunks) and chunks[-1] == b"data: [DONE]\n\n"
        assert sched.metrics()["running"] == 0


def test_per_request_work_the_body_can_ask_for_is_bounded(tiny_artifact):
    """A logit_bias over the whole vocabulary was validated and built per choice on the event loop (5 prompts x
    n 16 held it 7.6 s); stop strings had no length bound. Both are refused past their bounds in one line."""
    app = _app(tiny_artifact)
    model = os.path.basename(tiny_artifact)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias" and "300" in r.json()["error"]["message"], r.text
        for stop in ("x" * 1025, ["a", "x" * 1025]):
            r = c.post("/v1/completions", json={"model": model, "prompt": "hi", "stop": stop})
            assert r.status_code == 400 and r.json()["error"]["param"] == "stop" and "1024" in r.json()["error"]["message"], r.text
        r = c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2, "stop": ["x" * 1024],
                                            "logit_bias": {str(i): 1 for i in range(300)}})
        assert r.status_code == 200, r.text


def test_texts_that_cannot_fit_are_not_tokenized(tiny_artifact):
    """/tokenize tokenized a 1 MiB text on the event loop (3.6 s, every stream stalled) for a prompt no model
    context could hold, and chat tokenized a 1 MiB message history truncation then dropped (1.6 s). Both are
    known to overrun from their bytes alone (over the vocabulary's longest piece): refused, or dropped
    untokenized."""
    app = _app(tiny_artifact)
    model = os.path.basename(tiny_artifact)
    big = "ab " * 100_000
    with TestClient(app) as c:
        r = c.post("/tokenize", json={"model": model, "prompt": big})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        r = c.post("/tokenize", json={"model": model, "messages": [{"role": "user", "content": big}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert c.post("/tokenize", json={"model": model, "prompt": "ab " * 10}).json()["count"] > 0
        turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "how?"}]
        body = {"model": model, "max_tokens": 3, "temperature": 0}
        alone = c.post("/v1/chat/completions", json={**body, "messages": turns[1:]}).json()
        after_big = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": big}, *turns[1:]]}).json()
        assert after_big["choices"] == alone["choices"] and after_big["usage"] == alone["usage"], (after_big, alone)
        r = c.post("/v1/chat/completions", json={**body, "messages": [*turns, {"role": "user", "content": big}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_a_body_that_never_arrives_whole_is_a_408():
    import asyncio

    from starlette.requests import Request

    from gpt2onnx.serve.errors import APIError
    from gpt2onnx.serve.serving import capped_body

    async def receive(sent=[]):  # noqa: B006 - the first call sends part of the body, later ones wait for ever
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b'{"model": ', "more_body": True}
        await asyncio.Event().wait()

    async def read():
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [(b"content-length", b"100")]}
        return await capped_body(Request(scope, receive), 1 << 20, deadline_s=0.2)

    with pytest.raises(APIError) as e:
        asyncio.run(read())
    assert e.value.status == 408 and "did not arrive within 0.2 s" in e.value.message


def test_echo_alone_scores_each_prompt_once_for_its_n_choices(tiny_artifact):
    """max_tokens 0 with echo scored a prompt once per choice, n alike passes (n 8 of a 1,023-token prompt did not
    finish in 65 s in an audit); once now, the choices still n."""
    app = _app(tiny_artifact)
    model = os.path.basename(tiny_artifact)
    with TestClient(app) as c:
        sched = app.state.server.models[model].scheduler
        body = {"model": model, "prompt": ["one two three", "four five"], "max_tokens": 0, "echo": True, "logprobs": 2}
        before = sched.metrics()["prompt_tokens"]
        one = c.post("/v1/completions", json=body).json()
        scored = sched.metrics()["prompt_tokens"] - before
        many = c.post("/v1/completions", json={**body, "n": 3}).json()
        assert sched.metrics()["prompt_tokens"] - before == 2 * scored  # the second request ran its prompts once too
        assert [ch["index"] for ch in many["choices"]] == list(range(6))
        for i, ch in enumerate(many["choices"]):
            assert {k: v for k, v in ch.items() if k != "index"} == {k: v for k, v in one["choices"][i // 3].items() if k != "index"}
        assert many["usage"] == one["usage"]
        s = c.post("/v1/completions", json={**body, "n": 2, "stream": True})
        assert s.status_code == 200 and s.text.replace(' ', '').count('"finish_reason":"length"') == 4, s.text[-400:]
