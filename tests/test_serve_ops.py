"""What an operator running `gpt2onnx serve` behind a load balancer or in Kubernetes relies on: /health
that fails when the server cannot serve, logs of server errors, request ids carried through, the API key
from the environment read safely, signals, and the port refusing connections until the models are loaded.
In-process (FastAPI's TestClient) on synthetic:tiny, or the CLI as a process where signals are the point."""

from __future__ import annotations

import os

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
