"""OpenAI request bodies and their mapping onto GenerationConfig; the error body.

Fields OpenAI defines that this server cannot honour are refused with a 400 that names them,
rather than silently ignored (a client asking for best_of=4 must not get one sample back). Types
are strict, as OpenAI's are: "5", 5.0 or true is not a max_tokens, "yes" is not a stream.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, field_validator


def null_is(default):
    """OpenAI's schema lets this field be null (clients that send every field send it so): null is the default."""
    return BeforeValidator(lambda v: default if v is None else v)


Bias = Annotated[float, Field(ge=-100, le=100)]
# a JSON object's keys are strings: "50256"; below 2**63, so a huge one is a 400 here, not numpy's OverflowError
TokenKey = Annotated[int, Strict(False), Field(ge=0, lt=2**63)]
Flag = Annotated[bool, null_is(False)]
STRICT = ConfigDict(extra="forbid", strict=True)

MAX_N = 16
MAX_BIAS_ENTRIES = 300
MAX_STOP_CHARS = 1024
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (vLLM's _SAMPLING_EPS)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: Flag = False


class _Sampling(BaseModel):
    """The sampling fields completions and chat share (OpenAI's names; top_k, min_p,
    repetition_penalty and ignore_eos are extra fields vLLM also accepts)."""

    model_config = STRICT
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: off (vLLM's -1 too)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    n: Annotated[int, null_is(1)] = Field(default=1, ge=1, le=MAX_N)
    seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)  # int64, as OpenAI's and vLLM's
    stream: Flag = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as OpenAI documents it (abuse monitoring)
    ignore_eos: Flag = False  # vLLM's extra field: generate max_tokens whatever the model says (benchmarks)
    # OpenAI's: penalties over the tokens generated so far in each choice; bias by token id (the
    # JSON object's keys are ids as strings)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # at most MAX_BIAS_ENTRIES: each choice validates and builds its bias (a whole vocabulary's, 5 prompts x n 16,
    # held the event loop 7.6 s)
    logit_bias: dict[TokenKey, Bias] | None = Field(default=None, max_length=MAX_BIAS_ENTRIES)
    # a stop string is matched as it streams, in time linear in the text; its length is bounded all the same
    stop: str | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_length(cls, v):
        if any(len(s) > MAX_STOP_CHARS for s in ([v] if isinstance(v, str) else v or [])):
            raise ValueError(f"a stop string may hold at most {MAX_STOP_CHARS} characters")
        return v

    def unsupported(self) -> tuple[str, str] | None:
        """Why the body cannot be served as asked, and the field at fault (OpenAI's `param`); None if it can."""
        if self.stream_options is not None and not self.stream:
            return "stream_options is only allowed with stream=true", "stream_options"
        return None

    def max_tokens_asked(self) -> tuple[str, int | None]:
        """The reply's length limit the body asks for, and the field that asks it."""
        return "max_tokens", self.max_tokens

    def generation(self, max_tokens_default: int, max_tokens_cap: int) -> dict[str, Any]:
        """GenerationConfig keywords. OpenAI's temperature defaults to 1 (sampling); 0 is greedy."""
        field, asked = self.max_tokens_asked()
        max_new = asked or max_tokens_default
        if max_new > max_tokens_cap:
            raise ValueError(f"{field}={max_new} is above this server's limit of {max_tokens_cap}")
        temperature = 1.0 if self.temperature is None else self.temperature
        sample = temperature >= GREEDY_BELOW  # vLLM's: a temperature this low is greedy, not a draw over near-ties
        kw: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": sample}
        if self.ignore_eos:
            kw["eos_token_id"] = -1
        if sample:
            kw["temperature"] = temperature
        for name in ("top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        if self.top_k == -1:  # vLLM's "off"; ours is 0
            kw["top_k"] = 0
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if stop:
            kw["stop"] = stop
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: the prompt scored, nothing generated
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: Flag = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of < self.n:
            return f"best_of={self.best_of} must be at least n={self.n}", "best_of"
        if self.best_of not in (None, self.n):
            return "best_of above n is not supported; ask for n choices instead", "best_of"
        if self.suffix:
            return "suffix is not supported", "suffix"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens=0 generates nothing; it needs echo=true (the prompt back, with logprobs its tokens scored)", "max_tokens"
        return super().unsupported()

    @field_validator("prompt")
    @classmethod
    def _prompt_given(cls, p):
        if not p:
            raise ValueError("empty; pass text, token ids, or a non-empty list of them")
        return p

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    """A message's content as a list of parts (what LangChain and OpenAI's newer clients send): text only."""

    model_config = STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The message's text; parts joined by newlines, as vLLM joins them."""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: Flag = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs needs logprobs=true", "top_logprobs"
        return super().unsupported()

    def max_tokens_asked(self) -> tuple[str, int | None]:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return super().max_tokens_asked()


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's and llama-server's route): text, or chat messages as the DialoGPT
    prompt /v1/chat/completions would run (without dropping turns)."""

    model_config = STRICT
    model: str | None = None  # may be left out when the server has one model
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    return_token_strs: Flag = False

    def unsupported(self) -> tuple[str, str] | None:
        if (self.prompt is None) == (self.messages is None):
            return "give either prompt or messages", "prompt"
        return None


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids -> text."""

    model_config = STRICT
    model: str | None = None
    tokens: list[int]
