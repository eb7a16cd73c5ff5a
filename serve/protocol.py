"""OpenAI request bodies and their mapping onto GenerationConfig; the error body.

Fields OpenAI defines that this server cannot honour are refused with a 400 that names them,
rather than silently ignored (a client asking for best_of=4 must not get one sample back).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Bias = Annotated[float, Field(ge=-100, le=100)]

MAX_N = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """The sampling fields completions and chat share (OpenAI's names; top_k, min_p,
    repetition_penalty and ignore_eos are extra fields vLLM also accepts)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI documents it (abuse monitoring)
    ignore_eos: bool = False  # vLLM's extra field: generate max_tokens whatever the model says (benchmarks)
    # OpenAI's: penalties over the tokens generated so far in each choice; bias by token id (the
    # JSON object's keys are ids as strings)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[int, Bias] | None = None

    def unsupported(self) -> str | None:
        return None

    def generation(self, max_tokens_default: int, max_tokens_cap: int) -> dict[str, Any]:
        """GenerationConfig keywords. OpenAI's temperature defaults to 1 (sampling); 0 is greedy."""
        max_new = self.max_tokens or max_tokens_default
        if max_new > max_tokens_cap:
            raise ValueError(f"max_tokens={max_new} is above this server's limit of {max_tokens_cap}")
        temperature = 1.0 if self.temperature is None else self.temperature
        kw: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": temperature > 0}
        if self.ignore_eos:
            kw["eos_token_id"] = -1
        if temperature > 0:
            kw["temperature"] = temperature
        for name in ("top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if stop:
            kw["stop"] = stop
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.best_of not in (None, 1) and self.best_of != self.n:
            return "best_of is not supported"
        if self.suffix:
            return "suffix is not supported"
        if self.echo and self.logprobs is not None:
            return "echo with logprobs is not supported (prompt tokens' log-probabilities are not computed)"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def unsupported(self) -> str | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs needs logprobs=true"
        return super().unsupported()

    def generation(self, max_tokens_default: int, max_tokens_cap: int) -> dict[str, Any]:
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return super().generation(max_tokens_default, max_tokens_cap)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's and llama-server's route): text, or chat messages as the DialoGPT
    prompt /v1/chat/completions would run (without dropping turns)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None  # may be left out when the server has one model
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    return_token_strs: bool = False

    def unsupported(self) -> str | None:
        if (self.prompt is None) == (self.messages is None):
            return "give either prompt or messages"
        return None


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids -> text."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]
