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
        # a streamed request in flight when SIGTERM comes is finished, then the process exits 0; requests sent
        # after the signal get the plain server's 503 with Retry-After (they got Ray's 404 once serve.delete had
        # removed the route: a client does not retry a 404)
        body = {"model": model, "prompt": "x", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True}
        tokens, finishes, done, later = 0, [], False, []

        def after_the_signal():
            while proc.poll() is None and not [r for r in later if r.status_code != 200]:
                try:
                    later.append(httpx.post(url, json={"model": model, "prompt": "y", "max_tokens": 2}, timeout=30))
                except httpx.TransportError:
                    break
                time.sleep(0.05)

        asker = threading.Thread(target=after_the_signal, daemon=True)
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
                            asker.start()
                    else:
                        finishes.append(ch["finish_reason"])
        assert done and finishes == ["length"] and tokens == 120
        assert proc.wait(120) == 0
        asker.join(30)
        refused = [r for r in later if r.status_code != 200]
        assert refused and refused[0].status_code == 503 and refused[0].headers["retry-after"], \
            [(r.status_code, r.text[:100]) for r in later]
        assert refused[0].json()["error"]["message"].startswith("the server shut down")
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


def _start_in_own_group(tiny_artifact: str) -> tuple[subprocess.Popen, list[str]]:
    """`serve --ray` as a service manager starts it: a process group of its own, which the Ray processes it
    starts join. Returns the process once it has said it serves, and the lines it writes from then on."""
    proc = subprocess.Popen([sys.executable, "-m", "gpt2onnx.cli", "serve", tiny_artifact, "--ray", "--replicas", "1",
                             "--port", "0", "--provider", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline, line = time.time() + 240, ""
    while time.time() < deadline:
        line = proc.stderr.readline()
        if "serving" in line or not line:
            break
    assert "serving" in line, line
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stderr), daemon=True).start()
    return proc, out


def _end_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    try:  # whatever Ray left in the group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def test_ray_serve_stopped_with_its_process_group_exits_at_once(tiny_artifact):
    """systemd's default KillMode sends SIGTERM to every process of the service, Ray's GCS and raylet too:
    serve.delete then waited a minute on the gone GCS and Ray aborted the process with a C++ error (exit 1).
    Now: one line that says why the requests were cut and what to set, exit 0, at once."""
    proc, out = _start_in_own_group(tiny_artifact)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0  # it waited ~60 s on the gone GCS: this wait would time out
    finally:
        _end_group(proc)
    time.sleep(0.5)
    text = "".join(out)
    assert "Ray's processes were stopped by the same signal" in text and "KillMode=mixed" in text, text
    for noise in ("Traceback", "rpc_client", "Failed to connect to GCS"):
        assert noise not in text, text[-2000:]


def test_ray_serve_exits_when_its_gcs_is_gone(tiny_artifact):
    """A head that dies under a running server (its GCS killed) left `serve --ray` waiting for a signal with no
    route answering: a supervisor saw it alive. Now it says so in one line and exits 1, its Ray processes with it."""
    psutil = pytest.importorskip("psutil")
    proc, out = _start_in_own_group(tiny_artifact)
    try:
        gcs = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "gcs_server"]
        assert len(gcs) == 1, [p.name() for p in psutil.Process(proc.pid).children(recursive=True)]
        gcs[0].kill()
        assert proc.wait(30) == 1
    finally:
        _end_group(proc)
    time.sleep(0.5)
    text = "".join(out)
    assert "stopped answering; no request can be served; exiting" in text, text
    assert "Traceback" not in text, text[-2000:]
