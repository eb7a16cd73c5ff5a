"""`gpt2onnx serve ARTIFACT --ray` behaves like the plain server, tried as a new user would: the
same start line naming the models, warnings only (no access-log line per request from the ingress
or the replicas), and SIGTERM drains in-flight requests and exits 0 without Ray's signal dump or
an atexit traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("ray.serve")


def test_ray_serve_cli_matches_the_plain_server(tiny_artifact):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = os.path.basename(tiny_artifact)
    proc = subprocess.Popen([sys.executable, "-m", "gpt2onnx.cli", "serve", tiny_artifact, "--ray", "--replicas", "2",
                             "--port", str(port), "--provider", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline, line = time.time() + 240, ""
        while time.time() < deadline:
            line = proc.stderr.readline()
            if "serving" in line or not line:
                break
        assert line == f"gpt2onnx: serving {model} on http://127.0.0.1:{port}/v1 (2 Ray Serve replicas)\n", line
        out: list[str] = []
        readers = [threading.Thread(target=lambda f=f: out.extend(f), daemon=True) for f in (proc.stdout, proc.stderr)]
        for t in readers:
            t.start()
        url = f"http://127.0.0.1:{port}/v1/completions"
        for i in range(3):
            r = httpx.post(url, json={"model": model, "prompt": f"hello {i}", "max_tokens": 4}, timeout=60)
            assert r.status_code == 200, r.text
        # a streamed request in flight when SIGTERM comes is finished, then the process exits 0
        body = {"model": model, "prompt": "x", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True}
        tokens, finishes, done = 0, [], False
        with httpx.stream("POST", url, json=body, timeout=120) as r:
            assert r.status_code == 200
            for ln in r.iter_lines():
                if ln == "data: [DONE]":
                    done = True
                elif ln.startswith("data: "):
                    ch = json.loads(ln[6:])["choices"][0]
                    if ch["finish_reason"] is None:
                        tokens += 1
                        if tokens == 1:
                            proc.send_signal(signal.SIGTERM)
                    else:
                        finishes.append(ch["finish_reason"])
        assert done and finishes == ["length"] and tokens == 120
        assert proc.wait(120) == 0
        for t in readers:
            t.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(out)
    for noise in ("INFO", "Traceback", "SIGTERM received", "SystemExit", "(raylet)"):
        assert noise not in text, text[-2000:]


def test_ray_serve_on_a_port_in_use_is_one_line(tiny_artifact):
    """It was a RayTaskError traceback from Ray's proxy after 14 s; the plain server's line now, before Ray starts."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "gpt2onnx.cli", "serve", tiny_artifact, "--ray", "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use; choose another --port" in r.stderr
