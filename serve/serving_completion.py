"""POST /v1/completions: prompts (text, texts, token ids, lists of them) -> text_completion."""

from __future__ import annotations

from gpt2onnx.runtime.request import Result, Token

from .protocol import CompletionRequest
from .serving import Serving, finish


class CompletionServing(Serving):
    request_type = CompletionRequest
    route, object, chunk_object, id_prefix = "completions", "text_completion", "text_completion", "cmpl"

    def prompts(self) -> list[str | list[int]]:
        return self.body.prompts()

    def options(self) -> dict:
        kw = super().options()
        if self.body.logprobs is not None:
            kw["logprobs"] = self.body.logprobs
        return kw

    def echo(self, i: int) -> str:
        return self.model.engine.decode(self.handles[i].request.ids) if self.body.echo else ""

    def logprobs(self, i: int, events: list[Token]) -> dict | None:
        """OpenAI's legacy logprobs object: tokens, their log-probabilities, text offsets, alternatives."""
        if self.body.logprobs is None:
            return None
        decode = self.model.engine.decode
        toks = [decode([e.id]) for e in events]
        offsets, at = [], len(self.echo(i))
        for t in toks:
            offsets.append(at)
            at += len(t)
        return {"tokens": toks, "token_logprobs": [e.logprob for e in events], "text_offset": offsets,
                "top_logprobs": [{decode([t]): lp for t, lp in (e.top_logprobs or [])} for e in events]}

    def token_chunk(self, i: int, tok: Token) -> dict:
        text = (self.echo(i) if tok.index == 0 else "") + tok.text
        return {"index": i, "text": text, "logprobs": self.logprobs(i, [tok]), "finish_reason": None}

    def final_chunk(self, i: int, res: Result) -> dict:
        return {"index": i, "text": "", "logprobs": None, "finish_reason": finish(res)}

    def choice(self, i: int, res: Result) -> dict:
        return {"index": i, "text": self.echo(i) + res.text, "logprobs": self.logprobs(i, res.logprobs or []),
                "finish_reason": finish(res)}
