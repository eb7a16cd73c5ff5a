"""POST /v1/chat/completions: messages -> DialoGPT turns -> chat.completion.

Each user or assistant message is one DialoGPT turn (runtime/chat.py: its text and
`<|endoftext|>`); the model continues after the last. System and developer messages are dropped:
DialoGPT was trained on conversation turns only and has no instruction channel. A history longer
than the context beside max_tokens loses its oldest whole turns, as `gpt2onnx chat` does. Without
max_tokens a reply may use the context the history leaves, up to the server's cap (OpenAI's and
vLLM's chat default); the history then keeps room for the server's default max tokens.
"""

from __future__ import annotations

from gpt2onnx.runtime import Gpt2OnnxError
from gpt2onnx.runtime.chat import encode_turns, fit_history, joined
from gpt2onnx.runtime.request import Result, Token

from .errors import APIError
from .protocol import ChatCompletionRequest
from .serving import Serving, finish, token_str


class ChatServing(Serving):
    request_type = ChatCompletionRequest
    route, object, chunk_object, id_prefix = "chat", "chat.completion", "chat.completion.chunk", "chatcmpl"

    prompt_param = "messages"
    runtime_names = {"logprobs": "top_logprobs"}

    def prompts(self, kw: dict) -> list[list[int]]:
        engine, body, capacity = self.model.engine, self.body, self.model.scheduler.capacity
        texts = [m.text for m in body.messages if m.role in ("user", "assistant")]
        if not texts:
            raise APIError(400, "messages hold no user or assistant turn (system messages are ignored by DialoGPT models)",
                           param="messages")
        field, asked = body.max_tokens_asked()
        if kw["max_new_tokens"] >= capacity:
            raise APIError(400, f"{field}={kw['max_new_tokens']} leaves no room for messages in the {capacity}-position "
                           "context; lower it", param=field, code="context_length_exceeded")
        # a message surely longer than the history's room (bytes over the vocabulary's longest piece) is dropped
        # with every turn before it, untokenized (a 1 MiB message held the event loop 1.6 s, then was dropped)
        room = capacity - kw["max_new_tokens"]
        cut = max((i for i, t in enumerate(texts) if len(t or "") > room and engine.token_floor(t) + 1 > room), default=-1)
        if cut == len(texts) - 1:
            raise APIError(400, f"the last message (at least {engine.token_floor(texts[-1])} tokens) does not fit the {room} "
                           "tokens left for history beside the reply; shorten it or ask for fewer new tokens",
                           param="messages", code="context_length_exceeded")
        texts = texts[cut + 1:]
        try:
            turns = encode_turns(engine.tokenizer, texts, engine.eos_token_id)
        except Gpt2OnnxError as e:
            raise APIError(400, str(e), param="messages") from None
        try:
            turns = fit_history(turns, capacity - kw["max_new_tokens"])
        except Gpt2OnnxError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        prompt = joined(turns)
        if asked is None:  # the reply may take what the history leaves, up to the server's cap
            kw["max_new_tokens"] = min(self.server.cfg.max_tokens, capacity - len(prompt))
        return [prompt]

    def options(self) -> dict:
        kw = super().options()
        if self.body.logprobs:
            kw["logprobs"] = self.body.top_logprobs or 0
        return kw

    def entry(self, tok_id: int, lp: float) -> dict:
        b = self.model.engine.token_bytes(tok_id)
        return {"token": token_str(b), "logprob": lp, "bytes": list(b)}

    def logprobs(self, events: list[Token]) -> dict | None:
        if not self.body.logprobs:
            return None
        return {"content": [{**self.entry(e.id, e.logprob), "top_logprobs": [self.entry(t, lp) for t, lp in (e.top_logprobs or [])]}
                            for e in events]}

    def token_chunk(self, i: int, tok: Token) -> dict:
        delta = {"role": "assistant", "content": tok.text} if tok.index == 0 else {"content": tok.text}
        return {"index": i, "delta": delta, "logprobs": self.logprobs([tok]), "finish_reason": None}

    def final_chunk(self, i: int, res: Result) -> dict:
        return {"index": i, "delta": {}, "logprobs": None, "finish_reason": finish(res)}

    def choice(self, i: int, res: Result) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": res.text}, "logprobs": self.logprobs(res.logprobs or []),
                "finish_reason": finish(res)}
