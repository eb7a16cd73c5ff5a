"""POST /v1/completions: prompts (text, texts, token ids, lists of them) -> text_completion."""

from __future__ import annotations

import codecs

from gpt2onnx.runtime.request import Result, Token

from .protocol import CompletionRequest
from .serving import Serving, finish, token_str


class Offsets:
    """Each token's character offset in a choice's text. A token that ends inside a multi-byte
    character adds nothing until the token that completes it (the text holds whole characters)."""

    def __init__(self, start: int):
        self.at, self.utf8 = start, codecs.getincrementaldecoder("utf-8")("replace")

    def next(self, b: bytes) -> int:
        at = self.at
        self.at += len(self.utf8.decode(b))
        return at


class CompletionServing(Serving):
    request_type = CompletionRequest
    route, object, chunk_object, id_prefix = "completions", "text_completion", "text_completion", "cmpl"

    def prompts(self, kw: dict) -> list[str | list[int]]:
        self.prompt_list = self.body.prompts()
        self.offsets: dict[int, Offsets] = {}  # a streamed choice's offsets so far
        return self.prompt_list

    def options(self) -> dict:
        kw = super().options()
        if self.body.logprobs is not None:
            kw["logprobs"] = self.body.logprobs
        return kw

    def echo(self, i: int) -> str:
        """The prompt of choice i as sent: text as it came, token ids decoded with their special tokens."""
        if not self.body.echo:
            return ""
        p = self.prompt_list[i // self.body.n]
        return p if isinstance(p, str) else self.model.engine.tokenizer.decode(p, skip_special_tokens=False)

    def logprobs(self, i: int, events: list[Token], offsets: Offsets) -> dict | None:
        """OpenAI's legacy logprobs object: tokens, their log-probabilities, text offsets, alternatives."""
        if self.body.logprobs is None:
            return None
        piece = self.model.engine.token_bytes
        raw = [piece(e.id) for e in events]
        return {"tokens": [token_str(b) for b in raw], "token_logprobs": [e.logprob for e in events],
                "text_offset": [offsets.next(b) for b in raw],
                "top_logprobs": [{token_str(piece(t)): lp for t, lp in (e.top_logprobs or [])} for e in events]}

    def token_chunk(self, i: int, tok: Token) -> dict:
        text = (self.echo(i) if tok.index == 0 else "") + tok.text
        offsets = self.offsets.setdefault(i, Offsets(len(self.echo(i))))
        return {"index": i, "text": text, "logprobs": self.logprobs(i, [tok], offsets), "finish_reason": None}

    def final_chunk(self, i: int, res: Result) -> dict:
        return {"index": i, "text": "", "logprobs": None, "finish_reason": finish(res)}

    def choice(self, i: int, res: Result) -> dict:
        return {"index": i, "text": self.echo(i) + res.text, "logprobs": self.logprobs(i, res.logprobs or [], Offsets(len(self.echo(i)))),
                "finish_reason": finish(res)}
