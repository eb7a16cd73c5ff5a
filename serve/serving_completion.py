"""POST /v1/completions: prompts (text, texts, token ids, lists of them) -> text_completion."""

from __future__ import annotations

import asyncio
import codecs

from fastapi.responses import StreamingResponse

from gpt2onnx.runtime.request import Result, Token

from .protocol import CompletionRequest
from .serving import Serving, finish, token_str, whole
from .streaming import sse


class Offsets:
    """Each token's character offset in a choice's text. A token that ends inside a multi-byte
    character adds nothing until the token that completes it (the text holds whole characters)."""

    def __init__(self, start: int):
        self.at, self.utf8 = start, codecs.getincrementaldecoder("utf-8")("replace")

    def next(self, b: bytes, shown: bool = True) -> int:
        """Where a token of bytes `b` starts; `shown` False: a special token the text leaves out (0 wide)."""
        at = self.at
        if shown:
            self.at += len(self.utf8.decode(b))
        return at

    def end_prompt(self) -> None:
        """The echoed prompt is decoded by itself (a token prompt that ends inside a character ends in
        U+FFFD) and the completion's text starts afresh: count the prompt's dangling bytes, start again."""
        self.at += len(self.utf8.decode(b"", final=True))
        self.utf8.reset()


class CompletionServing(Serving):
    request_type = CompletionRequest
    route, object, chunk_object, id_prefix = "completions", "text_completion", "text_completion", "cmpl"

    def __init__(self, request, body):
        super().__init__(request, body)
        self.prompt_list = self.body.prompts()
        self.offsets: dict[int, Offsets] = {}  # a streamed choice's offsets so far

    def prompts(self, kw: dict) -> list[str | list[int]]:
        return self.prompt_list

    async def respond(self):
        if self.body.max_tokens == 0:  # echo alone: the prompts back (scored with logprobs), nothing generated
            # through the scheduler as any request (its queue bounds, cancelled on a disconnect or the timeout):
            # each prompt is only scored (Scheduler.submit with max_new_tokens 0), once for its n choices, which are
            # alike (n scoring passes of a 1,023-token prompt held the scheduler n x 10 s)
            self.per_prompt = 1
            self.handles = self.submit(self.prompt_list, self.options())
            self.server.metrics.requests.labels(route=self.route).inc()
            await self.wait()
            if self.body.stream:  # its scored prompts shaped off the event loop too (serving.whole)
                choices = await asyncio.to_thread(self._echoed)
                return StreamingResponse(self._echo_events(choices), media_type="text/event-stream")
            return await whole(lambda: self.envelope(self.object, self._echoed(), usage=self.usage([])))
        return await super().respond()

    def _echoed(self) -> list[dict]:
        """Every choice of an echo alone: its prompt back, scored with logprobs when asked."""
        return [{"index": i, "text": self.echo(i), "logprobs": self.prompt_logprobs(i), "finish_reason": "length"}
                for i in range(len(self.prompt_list) * self.body.n)]

    async def _echo_events(self, choices: list[dict]):
        for c in choices:
            yield sse(self.chunk([{**c, "finish_reason": None}]))
            yield sse(self.chunk([{"index": c["index"], "text": "", "logprobs": None, "finish_reason": "length"}]))
        if self.body.include_usage:
            yield sse(self.chunk([], usage=self.usage([])))
        yield b"data: [DONE]\n\n"

    def _prompt_events(self, i: int) -> list[Token]:
        """Choice i's prompt tokens scored (echo with logprobs), by its request's own prompt pass (complete
        once its first token is out, or with max_tokens 0 once it is done)."""
        scores = self.handles[i * self.per_prompt // self.body.n].request.prompt_scores if self.handles else None
        return scores.tokens if scores else []

    def _offsets(self, i: int) -> Offsets:
        """Where choice i's first logprobs token starts in its text: 0 when the prompt's tokens come first."""
        return Offsets(0 if self.body.echo and self.body.logprobs is not None else len(self.echo(i)))

    def prompt_logprobs(self, i: int) -> dict | None:
        events = self._prompt_events(i)
        return self.logprobs(i, events, Offsets(0), len(events))

    def options(self) -> dict:
        kw = super().options()
        if self.body.max_tokens == 0:  # echo alone: scored, even without logprobs (which validates and counts it)
            return {**kw, "max_new_tokens": 0, "prompt_logprobs": self.body.logprobs or 0}
        if self.body.logprobs is not None:
            kw["logprobs"] = self.body.logprobs
            if self.body.echo:  # each choice's prompt scored in its own prompt pass (Scheduler.submit)
                kw["prompt_logprobs"] = self.body.logprobs
        return kw

    def echo(self, i: int) -> str:
        """The prompt of choice i as sent: text as it came, token ids decoded with their special tokens."""
        if not self.body.echo:
            return ""
        p = self.prompt_list[i // self.body.n]
        return p if isinstance(p, str) else self.model.engine.tokenizer.decode(p, skip_special_tokens=False)

    def logprobs(self, i: int, events: list[Token], offsets: Offsets, prompt: int = 0) -> dict | None:
        """OpenAI's legacy logprobs object: tokens, their log-probabilities, text offsets, alternatives.
        `prompt`: how many of `events` are the echoed prompt's tokens. Each top_logprobs entry holds the k
        likeliest tokens and the token itself, as OpenAI's ("up to logprobs+1 elements") and vLLM's do."""
        if self.body.logprobs is None:
            return None
        piece, special = self.model.engine.token_bytes, self.model.engine.special_ids
        raw = [piece(e.id) for e in events]
        text_offset = []
        for j, (e, b) in enumerate(zip(events, raw)):
            if j == prompt and prompt and self.body.echo:
                offsets.end_prompt()
            # the echoed prompt keeps its special tokens' text; the completion's text leaves them out
            text_offset.append(offsets.next(b, shown=j < prompt or e.id not in special))
        top = [None if e.top_logprobs is None  # a prompt's first token, which nothing predicts
               else {**{token_str(piece(t)): lp for t, lp in e.top_logprobs}, token_str(b): e.logprob}
               for e, b in zip(events, raw)]
        return {"tokens": [token_str(b) for b in raw], "token_logprobs": [e.logprob for e in events],
                "text_offset": text_offset, "top_logprobs": top}

    def token_chunk(self, i: int, tok: Token) -> dict:
        first = tok.index == 0  # the echoed prompt, and with logprobs its scored tokens, come with the first token
        text = (self.echo(i) if first else "") + tok.text
        offsets = self.offsets.setdefault(i, self._offsets(i))
        prompt = self._prompt_events(i) if first else []
        return {"index": i, "text": text, "logprobs": self.logprobs(i, prompt + [tok], offsets, len(prompt)),
                "finish_reason": None}

    def final_chunk(self, i: int, res: Result) -> dict:
        return {"index": i, "text": "", "logprobs": None, "finish_reason": finish(res)}

    def choice(self, i: int, res: Result) -> dict:
        prompt = self._prompt_events(i)
        return {"index": i, "text": self.echo(i) + res.text,
                "logprobs": self.logprobs(i, prompt + (res.logprobs or []), self._offsets(i), len(prompt)),
                "finish_reason": finish(res)}
