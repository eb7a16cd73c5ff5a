"""The OpenAI-compatible server, driven the way users drive it: the official `openai` client and raw
HTTP (httpx) against `gpt2onnx serve` started on a free loopback port with synthetic:tiny."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

KEY = "sk-test-key"


class Server:
    """`gpt2onnx serve` in a subprocess on a free port; `url` is its /v1 base."""

    def __init__(self, artifact: str, *args: str, key: str | None = KEY):
        cmd = [sys.executable, "-m", "gpt2onnx.cli", "serve", artifact, "--port", "0", "--provider", "cpu", *args]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        env.pop("GPT2ONNX_API_KEY", None)
        if key:
            cmd += ["--api-key", key]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.model = os.path.basename(artifact)
        deadline = time.time() + 60
        line = ""
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if "serving" in line or not line:
                break
        if "serving" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line}{self.proc.stderr.read()}")
        self.base = line.split(" on ")[1].split()[0].removesuffix("/v1")
        self.url = self.base + "/v1"
        self.key = key
        self.log: list[str] = []  # its stderr after start-up
        self._drain = threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True)  # never let its pipe fill
        self._drain.start()

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url, api_key=self.key or "none", max_retries=0, timeout=60, **kw)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_artifact):
    s = Server(tiny_artifact, "--max-tokens", "64")
    yield s
    assert s.stop() == 0


def test_completions_with_the_openai_client(server):
    c = server.client()
    r = c.completions.create(model=server.model, prompt="Hello, how are you?", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    ch = r.choices[0]
    assert ch.finish_reason in ("stop", "length") and isinstance(ch.text, str)
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = c.completions.create(model=server.model, prompt="Hello, how are you?", max_tokens=8, temperature=0)
    assert again.choices[0].text == ch.text  # greedy is deterministic
    ids = c.completions.create(model=server.model, prompt=[15496, 11, 703], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_streamed_text_equals_the_whole_text(server):
    c = server.client()
    kw = dict(model=server.model, prompt="Tell me a story", max_tokens=24, temperature=0.8, top_p=0.9, seed=11)
    whole = c.completions.create(**kw)
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_with_the_openai_client(server):
    c = server.client()
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "Hi there!"}]
    r = c.chat.completions.create(model=server.model, messages=msgs, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in lp)
    streamed = c.chat.completions.create(model=server.model, messages=msgs, max_tokens=10, temperature=0, stream=True)
    parts = list(streamed)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == msg.content


def test_conversation_reuses_the_server_cache(server):
    """The second turn's messages extend the first (user, assistant reply): the server runs only
    the new tokens (its cached-token counter grows by the history's length)."""
    c = server.client()
    turn = [{"role": "user", "content": "What is the weather like?"}]
    first = c.chat.completions.create(model=server.model, messages=turn, max_tokens=6, temperature=0)
    before = server.metrics()[f'gpt2onnx_cached_tokens_total{{model="{server.model}"}}']
    turn += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "And tomorrow?"}]
    c.chat.completions.create(model=server.model, messages=turn, max_tokens=6, temperature=0)
    gained = server.metrics()[f'gpt2onnx_cached_tokens_total{{model="{server.model}"}}'] - before
    assert gained >= first.usage.prompt_tokens  # at least the first turn's prompt was not run again


def test_n_seed_echo_and_logprobs(server):
    c = server.client()
    r = c.completions.create(model=server.model, prompt="Once upon", max_tokens=6, n=2, seed=3, temperature=1.0, logprobs=2, echo=False)
    assert [ch.index for ch in r.choices] == [0, 1]
    for ch in r.choices:
        assert len(ch.logprobs.tokens) == len(ch.logprobs.token_logprobs) == len(ch.logprobs.top_logprobs)
    e = c.completions.create(model=server.model, prompt="Once upon", max_tokens=3, temperature=0, echo=True)
    assert e.choices[0].text.startswith("Once upon")


def test_models_health_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.model]
    assert server.client().models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("nope")
    h = httpx.get(server.base + "/health", timeout=10)  # no key needed
    assert h.status_code == 200 and h.json()["status"] == "ok"
    m = server.metrics()
    assert f'gpt2onnx_waiting{{model="{server.model}"}}' in m and f'gpt2onnx_time_to_first_token_seconds_count{{model="{server.model}"}}' in m
    assert m["process_resident_memory_bytes"] > 10e6
    assert all(f'gpt2onnx_gc_pause_seconds_count{{generation="{g}"}}' in m for g in "012")


def test_gc_pauses_are_timed_by_generation():
    import gc

    from gpt2onnx.serve.metrics import GcPauses

    p = GcPauses()
    p.watch(True)
    try:
        gc.collect()  # a full collection: generation 2
        gc.collect(0)
    finally:
        p.watch(False)
    assert p not in gc.callbacks
    seen = [sum(c) for c in p.counts]
    gc.collect()  # not watched any more
    assert [sum(c) for c in p.counts] == seen and seen[0] >= 1 and seen[2] >= 1 and p.sums[2] > 0
    (family,) = p.collect()
    full = {s.labels.get("le"): s.value for s in family.samples if s.name.endswith("_bucket") and s.labels["generation"] == "2"}
    assert full["+Inf"] == 1 and list(full.values()) == sorted(full.values())  # cumulative


@pytest.mark.parametrize("body, status, match", [
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": None, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": None, "prompt": "x", "max_tokens": 100000}, 400, "above this server's limit"),
    ({"model": None, "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": None, "prompt": [[1, 99999999]]}, 400, "outside the vocabulary"),
    ({"model": None, "prompt": "x " * 400}, 400, "longer than the 128-position context"),
    ({"model": None, "prompt": "x", "best_of": 3}, 400, "best_of above n is not supported"),
    ({"model": None, "prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
])
def test_bad_requests_get_openai_errors(server, body, status, match):
    if "model" in body and body["model"] is None:
        body["model"] = server.model
    r = httpx.post(server.url + "/completions", json=body, headers=server.headers(), timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["type"]


@pytest.mark.parametrize("route, body, param, match", [
    ("completions", {"prompt": []}, "prompt", "empty"),
    ("completions", {"prompt": 5}, "prompt", "not one of the types"),
    ("completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens", "valid integer"),
    ("completions", {"prompt": "x", "max_tokens": 5.0}, "max_tokens", "valid integer"),
    ("completions", {"prompt": "x", "n": True}, "n", "valid integer"),
    ("completions", {"prompt": "x", "stream": "yes"}, "stream", "valid boolean"),
    ("completions", {"prompt": "x", "logit_bias": {"-1": 5}}, "logit_bias", "greater than or equal to 0"),
    ("completions", {"prompt": "x", "best_of": 1, "n": 2}, "best_of", "best_of=1 must be at least n=2"),
    ("completions", {"prompt": "x", "best_of": 3}, "best_of", "best_of above n is not supported"),
    ("completions", {"prompt": "x", "suffix": "y"}, "suffix", "suffix is not supported"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens=0 generates nothing; it needs echo=true"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs",
     "top_logprobs needs logprobs=true"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream=true"),
    ("completions", {"prompt": ["hi"] * 10, "n": 16}, "n", "more than this server runs and queues at once"),
    ("completions", {"prompt": "x " * 400}, "prompt", "shorten the prompt or lower max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages", "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages", "messages[0].content: Field required"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages",
     "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100}, "max_completion_tokens",
     "max_completion_tokens=100 is above this server's limit of 64"),
    # refused by the runtime, not the body's schema: the runtime's error names its option, in the body's words
    ("completions", {"prompt": [[1, 99999999]]}, "prompt", "token id 99999999 in prompt 0 is outside the vocabulary"),
    ("completions", {"prompt": "x", "logit_bias": {"99999999": 1}}, "logit_bias", "outside the vocabulary"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"99999999": 1}}, "logit_bias",
     "outside the vocabulary"),
])
def test_bad_fields_name_their_param(server, route, body, param, match):
    """Strict types as OpenAI's (no "5" or 5.0 for an integer, no "yes" for a boolean), the field in
    `param` (not pydantic's union tags), a request that can never fit the queue is 400 (a 429 would be
    retried forever), a prompt too long for the context says what the HTTP client can change."""
    r = httpx.post(f"{server.url}/{route}", json={"model": server.model, **body}, headers=server.headers(), timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and match in err["message"] and "--truncate" not in err["message"], err


def test_chat_max_tokens_filling_the_context_names_max_tokens(tiny_artifact):
    s = Server(tiny_artifact, "--max-tokens", "512", key=None)
    try:
        for field in ("max_tokens", "max_completion_tokens"):
            body = {"model": s.model, "messages": [{"role": "user", "content": "Hi"}], field: 200}
            err = httpx.post(s.url + "/chat/completions", json=body, timeout=30).json()["error"]
            assert err["param"] == field and err["message"].startswith(f"{field}=200 leaves no room for messages"), err
    finally:
        assert s.stop() == 0


def test_chat_without_max_tokens_may_use_the_context_left(server, engine):
    """OpenAI's and vLLM's chat default: no 16-token cut; the reply may run to the server's cap."""
    c = server.client()
    r = c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi there!"}], temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 64 and r.choices[0].finish_reason == "length"  # the fixture's --max-tokens
    parts = c.chat.completions.create(model=server.model, temperature=0, max_tokens=6,
                                      messages=[{"role": "user", "content": [{"type": "text", "text": "Hi there!"}]}])
    plain = c.chat.completions.create(model=server.model, temperature=0, max_tokens=6,
                                      messages=[{"role": "user", "content": "Hi there!"}])
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_logprobs_give_each_tokens_own_bytes(server, engine):
    """A byte-level BPE token may hold part of a character: its logprob entry carries its own bytes
    (joined, they are the text) and a "bytes:\\x.." token string, as OpenAI's do; legacy text_offset
    points into the text; echo returns the prompt exactly as sent."""
    c = server.client()
    # a prompt in CJK and emoji: the tiny model's greedy reply to it splits characters across tokens
    r = c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "你好 😀"}], max_tokens=24,
                                  temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    raw = b"".join(bytes(e.bytes) for e in content)
    assert raw.decode("utf-8", "replace") == r.choices[0].message.content
    ids = engine.generate([engine.encode("你好 😀") + [engine.eos_token_id]], max_new_tokens=24, eos_token_id=-1)[0]
    assert [bytes(e.bytes) for e in content] == [engine.token_bytes(t) for t in ids]
    for e in content:
        b = bytes(e.bytes)
        assert e.token == (b.decode("utf-8") if _utf8(b) else "bytes:" + "".join(f"\\x{x:02x}" for x in b))
    assert any(not _utf8(bytes(e.bytes)) for e in content), "no partial token: pick another prompt"
    legacy = c.completions.create(model=server.model, prompt="你好 😀", max_tokens=24, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True}).choices[0]
    offs, text = legacy.logprobs.text_offset, legacy.text
    assert offs == sorted(offs) and offs[0] == 0 and offs[-1] <= len(text)
    streamed = [ch.choices[0].logprobs.text_offset[0] for ch in c.completions.create(
        model=server.model, prompt="你好 😀", max_tokens=24, temperature=0, logprobs=1, stream=True,
        extra_body={"ignore_eos": True}) if ch.choices and ch.choices[0].logprobs]
    assert streamed == offs
    echo = c.completions.create(model=server.model, prompt="a<|endoftext|>b", max_tokens=1, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("a<|endoftext|>b")


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_malformed_and_oversized_bodies(server):
    r = httpx.post(server.url + "/completions", content=b"{not json", headers={**server.headers(), "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = json.dumps({"model": server.model, "prompt": "x" * (2 << 20)})
    r = httpx.post(server.url + "/completions", content=big, headers={**server.headers(), "Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_api_key_checked_on_every_v1_route(server):
    bad = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=server.model, prompt="x", max_tokens=2)
    r = httpx.post(server.url + "/chat/completions", json={"model": server.model, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_errors_through_the_openai_client(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=server.model, messages=[{"role": "system", "content": "only"}], max_tokens=2)


def test_client_disconnect_cancels(server):
    key = f'gpt2onnx_cancelled_total{{model="{server.model}"}}'
    before = server.metrics()[key]
    body = {"model": server.model, "prompt": "Go on", "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/completions", json=body, headers=server.headers(), timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    deadline = time.time() + 10
    while server.metrics()[key] <= before and time.time() < deadline:
        time.sleep(0.1)
    assert server.metrics()[key] > before


def test_timeouts_and_disconnects_log_no_traceback(tiny_artifact):
    """A non-streaming request that times out (504) or whose client leaves (499) is answered and
    cancelled without asyncio logging the cancelled wait's exception, once per request."""
    s = Server(tiny_artifact, "--request-timeout-s", "0.02", key=None)
    try:
        body = {"model": s.model, "prompt": "Hello", "max_tokens": 100, "ignore_eos": True}
        for _ in range(3):
            assert httpx.post(s.url + "/completions", json=body, timeout=30).status_code == 504
    finally:
        assert s.stop() == 0
    s._drain.join(10)
    assert not [ln for ln in s.log if "Traceback" in ln or "never retrieved" in ln], "".join(s.log)


def test_full_queue_gets_429_with_retry_after(tiny_artifact):
    """One slot and no queue: of 8 requests sent at once, one runs and the others are refused at once."""
    from concurrent.futures import ThreadPoolExecutor

    s = Server(tiny_artifact, "--max-batch", "1", "--max-queue", "0", "--max-tokens", "120", key=None)
    try:
        body = {"model": s.model, "prompt": "x", "max_tokens": 120, "temperature": 0}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: httpx.post(s.url + "/completions", json=body, timeout=30), range(8)))
        busy = [a for a in answers if a.status_code == 429]
        assert busy and all(a.status_code in (200, 429) for a in answers)
        assert all(a.headers["Retry-After"].isdigit() and a.json()["error"]["type"] == "rate_limit_error" for a in busy)
        assert all(a.json()["usage"]["completion_tokens"] == 120 for a in answers if a.status_code == 200)
    finally:
        assert s.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_sigterm_finishes_in_flight_requests_and_exits_0(tiny_artifact, sig):
    """SIGHUP (a closed terminal; some supervisors' stop) killed the server mid-request; Ctrl-C drained, then
    said "interrupted" and exited 130. Every stop signal drains the same way now and exits 0."""
    s = Server(tiny_artifact, key=None)
    out = {}

    def slow():
        out["r"] = httpx.post(s.url + "/completions", json={"model": s.model, "prompt": "x", "max_tokens": 100, "temperature": 0,
                                                             "stop": [], "seed": 1}, timeout=60)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.5)
    s.proc.send_signal(sig)
    t.join(60)
    assert s.proc.wait(30) == 0
    assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] >= 1
    assert not [line for line in s.log if "interrupted" in line or "Traceback" in line], s.log


def test_sigterm_past_the_shutdown_timeout_answers_what_it_cancels(tiny_artifact):
    """Requests still running at --shutdown-timeout-s were cancelled by uvicorn mid-response: a plain-text
    500, streams cut mid-chunk without [DONE], CancelledError tracebacks. The schedulers drain from the
    start of the shutdown now: what they cancel answers 503 in OpenAI's shape, a stream an error event and
    [DONE]; what finished before is a 200; exit 0, nothing logged. A deadline of 0 and a queue seen holding
    requests when the signal goes (all 16 accepted by then) make the cut certain on a machine of any speed."""
    s = Server(tiny_artifact, "--shutdown-timeout-s", "0", "--max-batch", "1", key=None)
    body = {"model": s.model, "prompt": "x", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    out: dict[int, httpx.Response] = {}

    def ask(i: int) -> None:
        out[i] = httpx.post(s.url + "/completions", json={**body, "stream": i % 4 == 0}, timeout=60)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    # every request accepted (one that arrives after the signal gets the shutdown's refusal, another 503) and
    # some still queued
    while time.time() < deadline:
        m = s.metrics()
        if m.get('gpt2onnx_http_requests_total{route="completions"}', 0) == 16 and m.get(f'gpt2onnx_waiting{{model="{s.model}"}}', 0) > 0:
            break
        time.sleep(0.02)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert s.proc.wait(30) == 0
    codes = sorted(r.status_code for r in out.values())
    assert len(out) == 16 and set(codes) <= {200, 503} and 503 in codes, codes
    for i, r in out.items():
        if r.status_code == 503:
            assert r.json()["error"]["message"].startswith("the server shut down before the request finished")
            assert r.headers["retry-after"]
        elif i % 4 == 0:
            assert r.text.endswith("data: [DONE]\n\n"), r.text[-300:]
            done = '"finish_reason":"length"' in r.text.replace(" ", "")
            assert done != ("the server shut down before the request finished" in r.text), r.text[-300:]
        else:
            assert r.json()["usage"]["completion_tokens"] == 120
    assert not [line for line in s.log if "Traceback" in line or "ERROR" in line or "Cancel" in line], s.log


def test_serve_cli_errors_are_one_line(tiny_artifact, tmp_path):
    from .conftest import run_cli

    r = run_cli("serve", str(tmp_path / "missing"), "--port", "0")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = run_cli("serve", tiny_artifact, "--port", "70000")
    assert r.returncode == 2 and "port must be from 0 to 65535" in r.stderr
    r = run_cli("serve", tiny_artifact, "--max-batch", "0")
    assert r.returncode == 2 and "--max-batch must be" in r.stderr, r.stderr
    r = run_cli("serve", tiny_artifact, "--port", "0", "--host", "256.1.1.1")  # not an address: not the port's fault
    assert r.returncode == 2 and "check --host" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run_cli("serve", tiny_artifact, "--max-tokens", "32", "--default-max-tokens", "64")
    assert r.returncode == 2 and "--default-max-tokens (64) is above --max-tokens (32)" in r.stderr, r.stderr


def test_a_cap_below_the_default_lowers_the_default():
    from gpt2onnx.cli import _serve_config, build_parser

    assert _serve_config(build_parser().parse_args(["serve", "ART", "--max-tokens", "8"])).default_max_tokens == 8
    assert _serve_config(build_parser().parse_args(["serve", "ART", "--max-tokens", "100"])).default_max_tokens == 16


def test_load_with_faults_loses_nothing_and_does_not_grow(tiny_artifact):
    """64 concurrent clients, 3 rounds of 64 requests each (bounded in requests and time): streaming
    requests, some hanging up mid-stream, malformed JSON, oversized bodies and out-of-range values.
    Every well-formed request completes exactly once or gets a clear 429/503; /health answers
    throughout; the server's memory after the last round is within 10% (+16 MB) of after the first."""
    import asyncio
    import random

    s = Server(tiny_artifact, "--max-batch", "8", "--max-queue", "24", "--max-tokens", "32", key=None)
    url = s.url + "/completions"
    kinds = ["stream"] * 38 + ["hangup"] * 8 + ["malformed"] * 6 + ["oversized"] * 6 + ["range"] * 6
    outcome: dict[str, list] = {k: [] for k in set(kinds)}
    health_ok, rss = [], []

    async def one(client, kind: str, i: int):
        body = {"model": s.model, "prompt": f"request {i}", "max_tokens": 4 + i % 20, "temperature": 0.7, "seed": i, "stream": True}
        if kind == "malformed":
            r = await client.post(url, content=b'{"model": ', headers={"Content-Type": "application/json"})
            return r.status_code
        if kind == "oversized":
            r = await client.post(url, content=b'{"prompt": "' + b"x" * (1 << 21) + b'"}', headers={"Content-Type": "application/json"})
            return r.status_code
        if kind == "range":
            r = await client.post(url, json={**body, "top_p": 7})
            return r.status_code
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return r.status_code
            text, finishes, done = [], [], False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    ch = json.loads(line[6:])["choices"]
                    if ch:
                        text.append(ch[0]["text"])
                        if ch[0]["finish_reason"]:
                            finishes.append(ch[0]["finish_reason"])
                    if kind == "hangup":
                        return "hung up"
            return (done, finishes, "".join(text))

    async def health(client, stop):
        while not stop.is_set():
            # 200 each time, no time bound: the test's own event loop reads the 64 streams too, so a probe's
            # time is the client's as much as the server's (up to 1.4 s seen on 2 cores, either side's load)
            r = await client.get(s.base + "/health")
            health_ok.append(r.status_code == 200)
            await asyncio.sleep(0.2)

    async def main():
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            stop = asyncio.Event()
            h = asyncio.ensure_future(health(client, stop))
            for rnd in range(3):
                order = random.Random(rnd).sample(kinds, len(kinds))
                results = await asyncio.wait_for(asyncio.gather(*(one(client, k, 100 * rnd + i) for i, k in enumerate(order))), 120)
                for k, res in zip(order, results):
                    outcome[k].append(res)
                await asyncio.sleep(0.5)
                rss.append(s.rss_mb())
            stop.set()
            await h

    try:
        asyncio.run(main())
    finally:
        assert s.stop() == 0
    for res in outcome["stream"]:
        assert res in (429, 503) or (res[0] and len(res[1]) == 1 and res[1][0] in ("stop", "length")), res
    assert {k: len(v) for k, v in outcome.items()} == {k: 3 * kinds.count(k) for k in outcome}  # every request answered
    assert sum(isinstance(r, tuple) for r in outcome["stream"]) >= len(outcome["stream"]) // 2  # most were served
    assert "hung up" in outcome["hangup"] and set(outcome["hangup"]) <= {"hung up", 429, 503}  # some left mid-stream
    assert set(outcome["malformed"]) == {400} and set(outcome["range"]) == {400} and set(outcome["oversized"]) == {413}
    assert health_ok and all(health_ok)
    assert rss[-1] <= rss[0] * 1.10 + 16, rss


def test_slow_clients_do_not_stall_others(server):
    """A client that sends half a body and waits, and one that never reads its stream, while a
    normal request is served promptly."""
    import socket

    host, port = server.base.removeprefix("http://").split(":")
    slow_body = socket.create_connection((host, int(port)))
    slow_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n"
                      + f"Authorization: Bearer {server.key}\r\n\r\n".encode() + b'{"model": ')
    body = {"model": server.model, "prompt": "never read", "max_tokens": 60, "temperature": 0, "stream": True}
    reader = httpx.Client(timeout=30)
    stalled = reader.send(reader.build_request("POST", server.url + "/completions", json=body, headers=server.headers()), stream=True)
    try:
        t = time.perf_counter()
        r = server.client().completions.create(model=server.model, prompt="meanwhile", max_tokens=8, temperature=0)
        assert r.usage.completion_tokens >= 1 and time.perf_counter() - t < 10
    finally:
        stalled.close()
        reader.close()
        slow_body.close()


def test_an_app_frees_its_engine_and_scheduler_after_shutdown(tiny_artifact):
    """Build, serve and shut down an app in this process, drop it: nothing keeps its scheduler or
    engine (FastAPI's caches keyed by endpoint once kept every app's models through route closures)."""
    import gc
    import weakref

    from fastapi.testclient import TestClient

    from gpt2onnx.serve.app import build_app
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.server import load_models

    cfg = ServeConfig()
    models = load_models([tiny_artifact], cfg)
    sched, engine, name = weakref.ref(models[0].scheduler), weakref.ref(models[0].engine), models[0].name
    app = build_app(models, cfg)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 3, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        r = c.post("/v1/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200, r.text
    assert sched().closed  # the app's shutdown closed it
    del models, app, c, r
    gc.collect()
    assert sched() is None and engine() is None


def test_rss_is_flat_over_app_rounds(tiny_artifact):
    """Six build / serve / shut-down rounds in one fresh process (benchmarks/app_rounds.py): every
    round's scheduler is freed and resident memory grows < 15% (+16 MB) from the first round to the
    last. The 16 MB is glibc's: each round's new threads get malloc arenas that keep some freed
    memory (synthetic:tiny measured +16-23 MB over 6 rounds, a plateau under MALLOC_ARENA_MAX=2;
    before the fix it grew ~45 MB a round, DialoGPT-small int8 ~465 MB a round)."""
    r = subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.app_rounds", tiny_artifact, "--rounds", "6", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["alive"] == 0, out
    assert len(out["rss_mb"]) == 6 and out["rss_mb"][-1] < 1.15 * out["rss_mb"][0] + 16, out


def test_tokenize_and_detokenize(server, engine):
    """POST /tokenize and /detokenize with the model's tokenizer, raw and through the openai client
    (its generic post: these are vLLM's and llama-server's routes, not OpenAI's)."""
    text = "Hello, how are you?"
    r = httpx.post(server.base + "/tokenize", json={"model": server.model, "prompt": text, "return_token_strs": True},
                   headers=server.headers(), timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["tokens"] == engine.encode(text) and out["count"] == len(out["tokens"]) and out["max_model_len"] == engine.n_positions
    assert len(out["token_strs"]) == out["count"]
    back = httpx.post(server.base + "/detokenize", json={"model": server.model, "tokens": out["tokens"]}, headers=server.headers(), timeout=30)
    assert back.status_code == 200 and back.json() == {"prompt": text}
    c = server.client()
    chat = c.post(server.base + "/tokenize", cast_to=object, body={"model": server.model, "messages": [
        {"role": "system", "content": "dropped"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    eos = engine.eos_token_id
    assert chat["tokens"] == engine.encode("Hi") + [eos] + engine.encode("Hello") + [eos]
    assert c.post(server.base + "/detokenize", cast_to=object, body={"tokens": engine.encode("one model")}) == {"prompt": "one model"}
    for path, body, param in (("/tokenize", {"model": server.model}, "prompt"),
                              ("/detokenize", {"model": server.model, "tokens": [1, engine.vocab_size]}, "tokens"),
                              ("/detokenize", {"model": server.model, "tokens": "x"}, "tokens")):
        r = httpx.post(server.base + path, json=body, headers=server.headers(), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(server.base + "/tokenize", json={"model": server.model, "prompt": "x"}, timeout=30)
    assert r.status_code == 401


def test_chat_history_drops_oldest_turns_like_the_cli(server, engine):
    """A conversation longer than the context beside max_tokens loses its oldest whole turns, the
    same function as `gpt2onnx chat` (runtime/chat.py: fit_history); a last message that alone does
    not fit is refused with a 400 naming messages."""
    from gpt2onnx.runtime.chat import encode_turns, fit_history

    texts = [f"This is message number {i}, with a few more words to fill the context." for i in range(12)]
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]
    c = server.client()
    r = c.chat.completions.create(model=server.model, messages=msgs, max_tokens=20, temperature=0)
    kept = fit_history(encode_turns(engine.tokenizer, texts, engine.eos_token_id), engine.n_positions - 20)
    assert len(kept) < len(texts) and r.usage.prompt_tokens == sum(map(len, kept))
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "word " * 200}], max_tokens=20)
    assert e.value.body["param"] == "messages" and "does not fit" in e.value.body["message"]


def test_openai_sampling_fields_through_the_client(server, engine):
    """logit_bias, presence_penalty and frequency_penalty as OpenAI's own arguments, min_p as an
    extra field: the server's tokens are Engine.generate's with the same options."""
    c = server.client()
    prompt = engine.encode("Hello, how are you?")
    forced = 42
    r = c.completions.create(model=server.model, prompt=prompt, max_tokens=5, temperature=0, logit_bias={str(forced): 100})
    assert r.choices[0].text == engine.decode([forced] * 5) and r.usage.completion_tokens == 5
    kw = dict(max_new_tokens=8, eos_token_id=-1, presence_penalty=1.2, frequency_penalty=0.8)
    want = engine.generate([prompt], **kw)[0]
    r = c.completions.create(model=server.model, prompt=prompt, max_tokens=8, temperature=0, presence_penalty=1.2,
                             frequency_penalty=0.8, extra_body={"ignore_eos": True})
    assert r.choices[0].text == engine.decode(want)
    history = engine.encode("Hi there!") + [engine.eos_token_id]  # the chat route's DialoGPT prompt
    banned = engine.generate([history], max_new_tokens=1)[0][0]
    kw = dict(max_new_tokens=6, eos_token_id=-1, do_sample=True, temperature=0.9, seed=5, min_p=0.2, top_k=40,
              logit_bias={banned: -100})
    want = engine.generate([history], **kw)[0]
    assert banned not in want
    chat = c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Hi there!"}], max_tokens=6,
                                     temperature=0.9, seed=5, logit_bias={str(banned): -100},
                                     extra_body={"min_p": 0.2, "top_k": 40, "ignore_eos": True})
    assert chat.choices[0].message.content == engine.decode(want)


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("min_p", 1.5), ("logit_bias", {"42": 101}),
    ("logit_bias", {"forty-two": 1}), ("logit_bias", {"99999999": 1}), ("logit_bias", [1, 2]),
])
def test_bad_sampling_fields_are_400_naming_the_field(server, field, value):
    body = {"model": server.model, "prompt": "x", "max_tokens": 2, field: value}
    r = httpx.post(server.url + "/completions", json=body, headers=server.headers(), timeout=30)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                                extra_body={field: value})
    assert field in e.value.body["message"]


def test_cli_defaults_are_the_config_objects_and_capacity_is_settable(tiny_artifact):
    """No flag: exactly ServeConfig() (whose scheduler and session are SchedulerConfig() and
    SessionConfig()); --capacity and --no-keep-prefixes reach the scheduler of a running server."""
    from gpt2onnx.cli import _serve_config, build_parser
    from gpt2onnx.serve.config import ServeConfig

    assert _serve_config(build_parser().parse_args(["serve", "ART"])) == ServeConfig()
    cfg = _serve_config(build_parser().parse_args(["serve", "ART", "--capacity", "64", "--no-keep-prefixes", "--threads", "1"]))
    assert (cfg.scheduler.capacity, cfg.scheduler.keep_prefixes, cfg.session.threads) == (64, False, 1)
    s = Server(tiny_artifact, "--capacity", "64", "--no-keep-prefixes", key=None)
    try:
        assert httpx.post(s.base + "/tokenize", json={"prompt": "x"}, timeout=30).json()["max_model_len"] == 64
        r = httpx.post(s.url + "/completions", json={"model": s.model, "prompt": [1] * 60, "max_tokens": 8}, timeout=30)
        assert r.status_code == 400 and "64-position context" in r.json()["error"]["message"]
        body = {"model": s.model, "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 4, "temperature": 0}
        for _ in range(2):
            assert httpx.post(s.url + "/chat/completions", json=body, timeout=30).status_code == 200
        assert 'gpt2onnx_cached_tokens_total{model="' + s.model + '"} 0.0' in httpx.get(s.base + "/metrics", timeout=10).text
    finally:
        assert s.stop() == 0


def test_soak_reads_the_gc_pauses_from_metrics():
    from prometheus_client import CollectorRegistry, generate_latest

    from gpt2onnx.benchmarks.serve_soak import gc_pauses
    from gpt2onnx.serve.metrics import GcPauses

    p = GcPauses()
    for gen, seconds in ((0, 0.0004), (0, 0.003), (2, 0.07)):
        p("start", {})
        p.t0 -= seconds  # as if the collection had taken that long
        p("stop", {"generation": gen})
    r = CollectorRegistry()
    r.register(p)
    assert gc_pauses(generate_latest(r).decode()) == [
        "gc generation 0: 2 collections, 3.4 ms in all, longest <= 5 ms",
        "gc generation 1: no collections",
        "gc generation 2: 1 collections, 70.0 ms in all, longest <= 100 ms"]


def test_the_app_freezes_its_startup_heap_while_it_runs(tiny_artifact):
    """A full collection then walks only what requests made, not the ~80,000 objects alive at start."""
    import gc

    from fastapi.testclient import TestClient

    from gpt2onnx.serve.app import build_app
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.server import load_models

    cfg = ServeConfig()
    app = build_app(load_models([tiny_artifact], cfg), cfg)
    assert gc.get_freeze_count() == 0
    with TestClient(app) as c:
        assert gc.get_freeze_count() > 10_000
        assert c.get("/health").status_code == 200
    assert gc.get_freeze_count() == 0


def test_soak_fails_when_it_could_not_do_what_was_asked(tiny_artifact):
    """The soak's exit status is its verdict: nonsense settings are refused (--every 0 killed every client
    thread and still reported 'failures 0', exit 0), a soak cut short by its timeout fails, a whole one passes."""
    def soak(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.serve_soak", tiny_artifact, *args],
                              capture_output=True, text=True, timeout=180)

    for args, needle in [(["--every", "0"], "--every must be at least 1"), (["--clients", "0"], "--clients must be"),
                         (["--requests", "-5"], "--requests must be"), (["--timeout-s", "nan"], "--timeout-s must be")]:
        r = soak(*args)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
    r = soak("--requests", "6", "--clients", "2", "--every", "3")
    assert r.returncode == 0 and "6 requests in" in r.stdout and "failures 0 []" in r.stdout, (r.stdout, r.stderr)
    assert r.stdout.count("server RSS") == 2
    r = soak("--requests", "100000", "--clients", "1", "--every", "1000", "--timeout-s", "2")
    assert r.returncode == 1 and "stopped by --timeout-s after" in r.stderr, (r.stdout, r.stderr)


def test_stall_probe_measures_a_stream_around_a_whole_response(tiny_artifact, tmp_path):
    """benchmarks/serve_stall.py (the figures of the whole-response stall, reports/serve-stall): it refuses
    nonsense settings, and on synthetic:tiny measures a stall around a real scoring answer, the stream's
    largest gap no smaller than its median gap, and against another checkout alternates the two sides."""
    import os

    def stall(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.serve_stall", tiny_artifact, *args],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    for args, needle in [(["--prompts", "0"], "--prompts must be at least 1"), (["--base", str(tmp_path)], "not a gpt2onnx checkout")]:
        r = stall(*args)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = stall("--prompts", "2", "--prompt-len", "100", "--stream-tokens", "100", "--repeats", "2", "--base", root)
    assert r.returncode == 0, (r.stdout, r.stderr)
    runs = [ln for ln in r.stdout.splitlines() if " run " in ln]
    assert [ln.split()[0] for ln in runs] == ["base", "new", "new", "base"], r.stdout
    for side in ("base", "new"):
        fig = dict(kv.rsplit(" ", 1) for kv in r.stdout.split(f"{side:4} median: ")[1].splitlines()[0].split(", "))
        assert float(fig["stall_ms"]) >= float(fig["gap_p50_before_ms"]) > 0 and float(fig["response_mb"]) > 0, fig
