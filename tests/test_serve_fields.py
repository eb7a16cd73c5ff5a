"""Requests OpenAI's and vLLM's servers take that this one once refused or answered with a 500: explicit
nulls for nullable fields, vLLM's top_k=-1, absurd logit_bias keys, JSON nested too deep, and which
prompt of several a context error is about. In-process (FastAPI's TestClient) on synthetic:tiny."""

from __future__ import annotations

import os

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
    r = client.post("/v1/completions", json={"model": client.model, "prompt": "字" * 300_000, "max_tokens": 4})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and " at least " in err["message"], err
