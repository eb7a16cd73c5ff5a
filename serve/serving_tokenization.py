"""POST /tokenize and POST /detokenize with the model's own tokenizer (vLLM's and llama-server's routes).

    /tokenize    {"model", "prompt"} or {"model", "messages"} -> {"count", "max_model_len", "tokens"[, "token_strs"]}
    /detokenize  {"model", "tokens"}                          -> {"prompt"}
"""

from __future__ import annotations

from fastapi import Request

from gpt2onnx.runtime import Gpt2OnnxError
from gpt2onnx.runtime.chat import encode_turns, joined
from gpt2onnx.runtime.errors import require_utf8

from .errors import APIError
from .protocol import DetokenizeRequest, TokenizeRequest
from .serving import check_key, model_named, read_body


async def tokenize(request: Request):
    check_key(request)
    body = await read_body(request, TokenizeRequest)
    model = model_named(request, body.model)
    why = body.unsupported()
    if why:
        raise APIError(400, why[0], param=why[1])
    engine, limit = model.engine, model.scheduler.capacity
    texts = [m.text or "" for m in body.messages if m.role in ("user", "assistant")] if body.messages is not None else [body.prompt]
    # a text surely longer than the context is refused untokenized: the tokenizer holds the event loop
    # (and every stream) ~1.4 s a megabyte, and no prompt that long could run
    floor = sum(engine.token_floor(t) for t in texts if len(t) > limit)
    if floor > limit:
        field = "messages" if body.messages is not None else "prompt"
        raise APIError(400, f"the {field} holds at least {floor} tokens, more than this model's {limit}-position context",
                       param=field, code="context_length_exceeded")
    try:
        if body.messages is not None:
            ids = joined(encode_turns(engine.tokenizer, texts, engine.eos_token_id))
        else:
            require_utf8(body.prompt, "prompt", "prompt")
            ids = engine.tokenizer.encode(body.prompt, add_special_tokens=False).ids
    except Gpt2OnnxError as e:
        raise APIError(400, str(e), param=e.param) from None
    out = {"count": len(ids), "max_model_len": model.scheduler.capacity, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = [engine.tokenizer.id_to_token(t) for t in ids]
    return out


async def detokenize(request: Request):
    check_key(request)
    body = await read_body(request, DetokenizeRequest)
    engine = model_named(request, body.model).engine
    bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
    if bad:
        raise APIError(400, f"tokens: id {bad[0]} is outside the vocabulary 0..{engine.vocab_size - 1}", param="tokens")
    return {"prompt": engine.decode(body.tokens)}
