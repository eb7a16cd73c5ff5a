"""Requests OpenAI's and vLLM's servers take that this one once refused or answered with a 500: explicit
nulls for nullable fields, vLLM's top_k=-1, absurd logit_bias keys, JSON nested too deep, and which
prompt of several a context error is about. In-process (FastAPI's TestClient) on synthetic:tiny."""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def client(tiny_artifact):
    from gpt2onnx.serve.app import build_app
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.server import load_models

    cfg = ServeConfig()
    with TestClient(build_app(load_models([tiny_artifact], cfg), cfg), raise_server_exceptions=False) as c:
        c.model = os.path.basename(tiny_artifact)
        yield c


def test_null_nullable_fields_read_as_their_defaults(client):
    """OpenAI's schema makes n, stream, echo, chat logprobs and stream_options.include_usage nullable
    (vLLM's are Optional): clients that serialize every field send them as null."""
    plain = {"model": client.model, "prompt": "hi", "max_tokens": 2, "temperature": 0}
    r = client.post("/v1/completions", json={**plain, "n": None, "stream": None, "echo": None, "ignore_eos": None})
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == client.post("/v1/completions", json=plain).json()["choices"]  # one choice, no echo, not streamed
    chat = {"model": client.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": None}
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None, r.text
    r = client.post("/v1/completions", json={"model": client.model, "prompt": "hi", "max_tokens": 2, "stream": True,
                                             "stream_options": {"include_usage": None}})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") and '"usage"' not in r.text, r.text
    r = client.post("/tokenize", json={"prompt": "hi", "return_token_strs": None})
    assert r.status_code == 200 and "token_strs" not in r.json(), r.text


def test_top_k_minus_one_is_off_as_in_vllm(client):
    body = {"model": client.model, "prompt": "hi", "max_tokens": 8, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    off = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**body, "top_k": -1})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == off, r.text
    r = client.post("/v1/completions", json={**body, "top_k": -2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text


def test_a_huge_logit_bias_key_is_a_400_not_a_500(client):
    body = {"model": client.model, "prompt": "hi", "max_tokens": 2, "logit_bias": {"99999999999999999999999": 1}}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
def test_json_nested_too_deep_is_a_400_not_a_500(client, raw):
    r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text


def test_errors_name_the_prompt_they_are_about(client):
    r = client.post("/v1/completions", json={"model": client.model, "prompt": ["hi", "x " * 300], "n": 2, "max_tokens": 4})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["message"].startswith("prompt 1 "), err
    for prompt, says in (([[1, 2], []], "prompt 1 is empty"), ([[1, 2], [3, 4], [5, 99999]], "token id 99999 in prompt 2 ")):
        r = client.post("/v1/completions", json={"model": client.model, "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith(says), r.text


def test_a_huge_text_prompt_is_refused_without_tokenizing_it(client):
    """~1 MB of text once held the event loop (every stream, /health) for the 1.4 s its tokenizing took."""
    body = {"model": client.model, "prompt": "字" * 300_000, "max_tokens": 4}
    # 900 KB as UTF-8, under the 1 MiB body cap (httpx before 0.28 sends json= as \u escapes: 1.8 MB, a 413)
    r = client.post("/v1/completions", content=json.dumps(body, ensure_ascii=False).encode(),
                    headers={"Content-Type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and " at least " in err["message"], err


def test_include_usage_puts_a_null_usage_on_every_chunk_but_the_last(client):
    """OpenAI: with stream_options.include_usage every chunk carries `usage`, null until the last
    chunk (empty choices), which has the counts; clients that read chunk["usage"] rely on the key."""
    body = {"model": client.model, "prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = client.post("/v1/completions", json=body)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert len(chunks) >= 3 and all("usage" in c for c in chunks), r.text
    assert all(c["usage"] is None and c["choices"] for c in chunks[:-1]), r.text
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3, r.text


def test_a_server_of_several_models_asks_which_one(tiny_artifact, tmp_path):
    """/tokenize may leave `model` out when one is served; with two it is a 400 naming the field and
    the choices, not a 404 for a model called None."""
    from gpt2onnx.serve.app import build_app
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.server import load_models

    other = shutil.copytree(tiny_artifact, tmp_path / "other")
    cfg = ServeConfig()
    with TestClient(build_app(load_models([tiny_artifact, str(other)], cfg), cfg), raise_server_exceptions=False) as c:
        r = c.post("/tokenize", json={"prompt": "hi"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "model", r.text
        assert "model is required" in err["message"] and "other" in err["message"] and os.path.basename(tiny_artifact) in err["message"]
        r = c.post("/tokenize", json={"model": "other", "prompt": "hi"})
        assert r.status_code == 200 and r.json()["count"] >= 1, r.text


def test_echo_with_logprobs_scores_the_prompt(client):
    """OpenAI's echo with logprobs (what lm-evaluation-harness's completions backend sends for loglikelihood):
    the prompt's tokens come first in logprobs, the first with null, each the log-probability Engine.score
    gives, then the generated tokens exactly as without echo; text_offset indexes the echoed text."""
    engine = client.app.state.server.models[client.model].engine
    prompt = "Hello there, how are you"
    ids = engine.encode(prompt)
    want = engine.score(ids, 2)
    plain = {"model": client.model, "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2}
    gen = client.post("/v1/completions", json=plain).json()["choices"][0]
    r = client.post("/v1/completions", json={**plain, "echo": True})
    c = r.json()["choices"][0]
    lp = c["logprobs"]
    assert r.status_code == 200 and c["text"] == prompt + gen["text"], r.text
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert np.allclose(lp["token_logprobs"][1: len(ids)], [t.logprob for t in want[1:]], atol=1e-6)
    # the same tokens; their values within float noise (the second request reuses the prompt the first left held)
    assert np.allclose(lp["token_logprobs"][len(ids):], gen["logprobs"]["token_logprobs"], atol=1e-5)
    assert lp["tokens"][len(ids):] == gen["logprobs"]["tokens"]
    # the 2 likeliest and the token itself (OpenAI: "up to logprobs+1 elements")
    assert all(d[t] == v and len(d) in (2, 3) for t, v, d in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]))
    n = len(ids)
    assert lp["text_offset"][:n] == [prompt.index(t, o) for t, o in zip(lp["tokens"][:n], lp["text_offset"][:n])]
    assert lp["text_offset"][len(ids)] == len(prompt)


def test_echo_with_logprobs_runs_the_prompt_once(client, monkeypatch):
    """A generation with echo and logprobs scores its prompt in its own prompt pass (the scheduler's
    prompt_logprobs), not in a second pass of Engine.score beside it: whole and streamed, with n=2 each
    choice carries the scored prompt, its values those Engine.score gives."""
    engine = client.app.state.server.models[client.model].engine
    prompt = "Once upon a time there"
    want = [t.logprob for t in engine.score(prompt, 1)]
    monkeypatch.setattr(type(engine), "score", lambda *a, **k: pytest.fail("the prompt was scored in a pass of its own"))
    body = {"model": client.model, "prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 1, "n": 2, "seed": 4}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for c in r.json()["choices"]:
        lps = c["logprobs"]["token_logprobs"]
        assert c["text"].startswith(prompt) and lps[0] is None and np.allclose(lps[1: len(want)], want[1:], atol=1e-6)
        assert len(lps) == len(want) + 2
    r = client.post("/v1/completions", json={**body, "stream": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    firsts = {}
    for ch in chunks:
        for c in ch["choices"]:
            firsts.setdefault(c["index"], c)
    assert sorted(firsts) == [0, 1], r.text
    for c in firsts.values():
        lps = c["logprobs"]["token_logprobs"]
        assert c["text"].startswith(prompt) and lps[0] is None and np.allclose(lps[1: len(want)], want[1:], atol=1e-6)


def test_max_tokens_zero_with_echo_returns_the_scored_prompt(client):
    """Scoring alone (max_tokens 0, echo, logprobs): the prompt back with its tokens' log-probabilities,
    nothing generated, whole or streamed; several prompts each scored by itself."""
    engine = client.app.state.server.models[client.model].engine
    prompts = ["The cat sat", "on the mat"]
    body = {"model": client.model, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1}
    r = client.post("/v1/completions", json=body)
    out = r.json()
    assert r.status_code == 200, r.text
    assert [c["text"] for c in out["choices"]] == prompts
    assert [c["finish_reason"] for c in out["choices"]] == ["length", "length"]
    for c, p in zip(out["choices"], prompts):
        want = [t.logprob for t in engine.score(p, 1)]
        assert c["logprobs"]["token_logprobs"][0] is None and np.allclose(c["logprobs"]["token_logprobs"][1:], want[1:], atol=1e-6)
    n = sum(len(engine.encode(p)) for p in prompts)
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    r = client.post("/v1/completions", json={**body, "prompt": "The cat sat", "stream": True, "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.endswith("data: [DONE]\n\n") and chunks[0]["choices"][0]["text"] == "The cat sat", r.text
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"] == out["choices"][0]["logprobs"]["token_logprobs"]
    assert chunks[1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 0
    r = client.post("/v1/completions", json={**body, "prompt": [5, 99999999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_whole_responses_are_shaped_off_the_event_loop(client, monkeypatch):
    """A response sent whole is shaped (choices, logprobs) and encoded in a worker thread: on the event loop,
    16 echoed 1,000-token prompts with logprobs 5 (a 4 MB body) held every other client's stream 839 ms
    (median, DialoGPT-small int8, 2 cores: reports/serve-stall). Completions, echo alone (whole and streamed) and chat, each checked
    where its choices are built: no event loop runs in that thread."""
    import asyncio

    from gpt2onnx.serve.serving_chat import ChatServing
    from gpt2onnx.serve.serving_completion import CompletionServing

    on_loop = []

    def where(f):
        def wrapped(*a, **k):
            try:
                asyncio.get_running_loop()
                on_loop.append(f.__name__)
            except RuntimeError:
                pass
            where.calls += 1
            return f(*a, **k)
        return wrapped

    where.calls = 0
    for cls, name in ((CompletionServing, "choice"), (CompletionServing, "_echoed"), (ChatServing, "choice")):
        if hasattr(cls, name):  # _echoed: where echo alone's choices are built
            monkeypatch.setattr(cls, name, where(getattr(cls, name)))
    body = {"model": client.model, "prompt": "The cat sat", "logprobs": 2, "max_tokens": 3}
    for b in (body, {**body, "echo": True, "max_tokens": 0}, {**body, "echo": True, "max_tokens": 0, "stream": True}):
        r = client.post("/v1/completions", json=b)
        assert r.status_code == 200 and ("The cat sat" in r.text) == ("echo" in b), r.text
    r = client.post("/v1/chat/completions", json={"model": client.model, "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"]["content"], r.text
    assert on_loop == [] and where.calls == 4, (on_loop, where.calls)


def test_echo_alone_is_a_scheduler_request_that_needs_only_its_prompt_to_fit(client):
    """max_tokens 0 ran Engine.score in a thread beside the scheduler: past the queue's bound, never cancelled
    by a disconnect or the request timeout (a 2 s timeout answered 200 after 74 s). It is a scheduler request
    now, ended after its prompt pass, so it takes a prompt that fills the whole context."""
    model = client.app.state.server.models[client.model]
    # a client has its result when the last token is published; the loop counts it and frees the slot just
    # after, so an earlier test's request may still be counted here: wait for the loop to settle
    deadline = time.monotonic() + 10
    while model.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    before = dict(model.scheduler.counters)
    full = [int(t) for t in np.arange(model.engine.n_positions) % 1000 + 1]
    body = {"model": client.model, "prompt": full, "max_tokens": 0, "echo": True, "logprobs": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(full) and lp["token_logprobs"][0] is None
    want = model.engine.score(full)
    assert np.allclose(lp["token_logprobs"][1:], [t.logprob for t in want[1:]], atol=1e-5)
    assert model.scheduler.counters["requests"] == before["requests"] + 1
    assert model.scheduler.counters["generated_tokens"] == before["generated_tokens"]
    r = client.post("/v1/completions", json={**body, "prompt": full + [1]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt", r.text
    assert err["message"].endswith("longer than the 128-position context; shorten the prompt"), err
    r = client.post("/v1/completions", json={"model": client.model, "prompt": [999, 998], "max_tokens": 3})
    assert r.status_code == 200, r.text  # its held row (a whole context) leaves room for the next steps


def test_the_scheduler_scores_a_prompt_alone_with_max_new_tokens_zero(engine):
    from gpt2onnx.runtime import Gpt2OnnxError, Scheduler

    with Scheduler(engine) as sched:
        res = sched.submit([464, 2068, 7586], max_new_tokens=0, prompt_logprobs=2).result()
        assert res.tokens == [] and res.text == "" and res.finish_reason == "length"
        assert [(t.id, t.logprob) for t in res.prompt_logprobs] == [(t.id, t.logprob) for t in engine.score([464, 2068, 7586], 2)]
        with pytest.raises(Gpt2OnnxError, match="max_new_tokens must be >= 1"):  # without prompt_logprobs, as anywhere
            sched.submit([464], max_new_tokens=0)
        assert sched.submit([464, 2068], max_new_tokens=3).result().tokens  # and generation goes on after it


def test_lm_evaluation_harness_loglikelihood_request(client):
    """The body lm-evaluation-harness's local-completions model sends for a log-likelihood (a batch of
    token-id prompts, max_tokens 1, logprobs 1, echo) and its parsing: the continuation's summed
    log-probability (token_logprobs[ctxlen:-1]) and whether it was greedy (each token the top one)."""
    engine = client.app.state.server.models[client.model].engine
    context, conts = [464, 2068, 7586], [[21831, 18045], [625, 262, 50256]]
    body = {"model": client.model, "prompt": [context + c for c in conts], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for choice, c in zip(sorted(r.json()["choices"], key=lambda x: x["index"]), conts):
        lps, tops = choice["logprobs"]["token_logprobs"][len(context):-1], choice["logprobs"]["top_logprobs"][len(context):-1]
        want = engine.score(context + c, 1)[len(context):]
        assert len(lps) == len(c) and abs(sum(lps) - sum(t.logprob for t in want)) < 1e-5
        greedy = all(lp == max(top.values()) for lp, top in zip(lps, tops))
        assert greedy == all(t.id == t.top_logprobs[0][0] for t in want)


def test_completion_top_logprobs_always_hold_the_chosen_token(client):
    """OpenAI's legacy completions return the chosen token's log-probability among its alternatives ("up
    to logprobs+1 elements"), as vLLM does: logprobs=0 gives {token: logprob}, and a sampled token outside
    the k likeliest is there beside them."""
    body = {"model": client.model, "prompt": "Hello", "max_tokens": 12, "temperature": 1.5, "seed": 4, "ignore_eos": True}
    lp = client.post("/v1/completions", json={**body, "logprobs": 0}).json()["choices"][0]["logprobs"]
    assert lp["top_logprobs"] == [{t: v} for t, v in zip(lp["tokens"], lp["token_logprobs"])]
    lp = client.post("/v1/completions", json={**body, "logprobs": 1}).json()["choices"][0]["logprobs"]
    for t, v, d in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert d[t] == v and len(d) == (1 if v == max(d.values()) else 2), (t, v, d)
    assert any(len(d) == 2 for d in lp["top_logprobs"])  # this seed samples outside the top 1 at least once


def test_echo_of_a_token_prompt_ending_inside_a_character_keeps_its_offsets(client):
    """A token prompt that ends inside a UTF-8 character echoes as U+FFFD (decoded by itself) and the
    completion's text starts afresh: text_offset follows that text, not one decoder run over both."""
    engine = client.app.state.server.models[client.model].engine
    ids = engine.encode("ok 🙂")
    cut = next(n for n in range(len(ids), 0, -1) if engine.tokenizer.decode(ids[:n]).endswith("\ufffd"))
    prompt = ids[:cut]  # ends inside the emoji's four bytes
    body = {"model": client.model, "prompt": prompt, "max_tokens": 4, "seed": 1, "echo": True, "logprobs": 0}
    for stream in (False, True):
        r = client.post("/v1/completions", json={**body, "stream": stream})
        if stream:
            chunks = [json.loads(line[6:])["choices"][0] for line in r.text.splitlines() if line.startswith("data: {")]
            c = {"text": "".join(ch["text"] for ch in chunks),
                 "logprobs": {k: sum((ch["logprobs"][k] for ch in chunks if ch["logprobs"]), []) for k in ("tokens", "text_offset")}}
        else:
            c = r.json()["choices"][0]
        echo = engine.tokenizer.decode(prompt)
        offs = c["logprobs"]["text_offset"]
        assert c["text"].startswith(echo) and offs[cut] == len(echo), (stream, c)
        assert offs == sorted(offs) and offs[-1] <= len(c["text"]), (stream, c)


def test_a_negative_seed_is_taken_as_vllm_and_openai_take_it(client):
    """seed is a signed 64-bit integer in OpenAI's API and vLLM's (clients send -1 or negative hashes)."""
    body = {"model": client.model, "prompt": "hi", "max_tokens": 8, "temperature": 1.0, "seed": -1, "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"] == client.post("/v1/completions", json=body).json()["choices"], r.text
    two = client.post("/v1/completions", json={**body, "n": 2}).json()["choices"]  # choice i: seed + i, wrapping as int64
    assert two[0]["text"] == r.json()["choices"][0]["text"] and two[1]["text"] != two[0]["text"]
    top = client.post("/v1/completions", json={**body, "seed": 2**63 - 1, "n": 2})
    assert top.status_code == 200, top.text
    chat = {"model": client.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": -2**63}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    r = client.post("/v1/completions", json={**body, "seed": 2**63})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text


def test_too_many_sequences_name_what_to_lower(client):
    """More prompts x n than the server runs and queues at once is a 400 (it would be a 429 on every retry)
    whose param is what the client sent too much of: the prompts, or n when it asked for several."""
    sched = client.app.state.server.models[client.model].scheduler
    room = sched.config.max_batch + sched.config.max_queue
    body = {"model": client.model, "max_tokens": 1}
    r = client.post("/v1/completions", json={**body, "prompt": ["hi"] * (room + 1)})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = client.post("/v1/completions", json={**body, "prompt": ["hi"] * (room // 2 + 1), "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def test_a_lone_surrogate_is_a_400_everywhere_text_is_taken(client):
    """JSON's "\\ud800" is a str Python holds and UTF-8 cannot encode: completions refused it, chat and
    /tokenize answered 500 (the tokenizer's TypeError) with a traceback in the log."""
    bad = "hi \ud800"
    for route, body, param in [
        ("/v1/completions", {"prompt": bad, "max_tokens": 2}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": bad}], "max_tokens": 2}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": bad}]}], "max_tokens": 2}, "messages"),
        ("/tokenize", {"prompt": bad}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": "fine"}, {"role": "assistant", "content": bad}]}, "messages"),
    ]:
        raw = json.dumps({"model": client.model, **body}).encode()  # ASCII JSON: the surrogate as its \\ud800 escape
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == param and "not valid UTF-8" in err["message"], (route, r.text)


def test_text_offsets_skip_the_special_tokens_the_text_leaves_out(client):
    """A generated <|endoftext|> (ignore_eos) is not in the completion's text, so it adds nothing to the
    offsets after it (they counted its 13 characters: [0, 13, 26] for a text of nothing)."""
    body = {"model": client.model, "prompt": "hi", "max_tokens": 3, "ignore_eos": True, "logit_bias": {"50256": 100},
            "temperature": 0, "logprobs": 0}
    c = client.post("/v1/completions", json=body).json()["choices"][0]
    assert c["logprobs"]["tokens"] == ["<|endoftext|>"] * 3 and c["text"] == ""
    assert c["logprobs"]["text_offset"] == [0, 0, 0]
    c = client.post("/v1/completions", json={**body, "echo": True}).json()["choices"][0]
    assert c["text"] == "hi" and c["logprobs"]["text_offset"][-3:] == [2, 2, 2]
    r = client.post("/v1/completions", json={**body, "stream": True})
    offs = [o for line in r.text.splitlines() if line.startswith("data: {")
            for c in json.loads(line[6:])["choices"] if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert offs == [0, 0, 0], r.text


def test_context_errors_carry_their_code_and_routing_errors_count(client):
    """A chat max_tokens that fills the context is context_length_exceeded, as completions' is; 404 and 405
    from routing count in /metrics as every other error does."""
    r = client.post("/v1/chat/completions", json={"model": client.model, "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 128})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text

    def errors(status: str) -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("gpt2onnx_http_errors_total{") and f'status="{status}"' in line:
                return float(line.split()[-1])
        return 0.0

    n404, n405 = errors("404"), errors("405")
    assert client.get("/v1/nothing").status_code == 404 and client.get("/v1/completions").status_code == 405
    assert (errors("404"), errors("405")) == (n404 + 1, n405 + 1)


def test_a_client_gone_while_sending_its_body_is_a_499_not_a_500():
    import asyncio

    from starlette.requests import ClientDisconnect

    from gpt2onnx.serve.errors import APIError
    from gpt2onnx.serve.serving import capped_body

    class Half:
        headers = {"content-length": "1000"}

        async def stream(self):
            yield b'{"model": '
            raise ClientDisconnect()

    with pytest.raises(APIError) as e:
        asyncio.run(capped_body(Half(), 10_000))
    assert e.value.status == 499


ROUTES = {"/v1/completions": {"prompt": "hi", "max_tokens": 2}, "/v1/chat/completions":
          {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, "/tokenize": {"prompt": "hi"},
          "/detokenize": {"tokens": [1, 2]}}


@pytest.mark.parametrize("route", ROUTES)
def test_a_body_not_sent_as_json_is_a_415(client, route):
    """A browser page may send text/plain, a form or multipart to any origin unasked (a CORS simple request):
    parsed as JSON, such a POST to a server on localhost would run. FastAPI's body parsing and so vLLM refuse
    them; JSON types with parameters, +json types and no Content-Type at all are taken."""
    raw = json.dumps({"model": client.model, **ROUTES[route]}).encode()
    generated = lambda: sum(m.scheduler.counters["requests"] + m.scheduler.counters["generated_tokens"] for m in client.app.state.server.models.values())  # noqa: E731
    before = generated()
    for media in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                  "multipart/form-data; boundary=x", "application/jsonx", ""):
        r = client.post(route, content=raw, headers={"Content-Type": media})
        err = r.json()["error"]
        assert r.status_code == 415 and "application/json" in err["message"] and err["type"] == "invalid_request_error", (media, r.text)
    assert generated() == before  # nothing ran
    for media in ("application/json", "application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json", None):
        r = client.post(route, content=raw, headers={"Content-Type": media} if media else {})
        assert r.status_code == 200, (media, r.text)
