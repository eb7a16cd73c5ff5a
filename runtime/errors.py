"""The exception types the CLI turns into one-line messages and the server into HTTP statuses."""


class Gpt2OnnxError(Exception):
    """A user-facing error: the message says what is wrong and what to do; `param` names the option or
    input at fault where one is (the server puts it in OpenAI's error body, in the API's own names)."""

    param: str | None = None

    def __init__(self, *args, param: str | None = None):
        super().__init__(*args)
        if param is not None:
            self.param = param


def require_utf8(text: str, what: str, param: str) -> None:
    """Refuse text that UTF-8 cannot encode (a lone surrogate, which JSON's \\ud800 escape can carry):
    the tokenizer would fail on it with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Gpt2OnnxError(f"{what} is not valid UTF-8 (it holds a lone surrogate); pass UTF-8 text", param=param) from None


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one line for a log, a warning or a record: its type and the first line of its
    message, cut at `limit` characters (onnxruntime's messages run to many lines)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:limit] if text else ''}"


class ContextOverflow(Gpt2OnnxError):
    """A request that does not fit the context: prompt `index` has `prompt_len` tokens and asks for
    `max_new` more in `limit` positions (`prompt_len` 0: max_new alone leaves no room). Front ends
    word it with their own option names (the server says max_tokens, and has no truncate)."""

    def __init__(self, index: int, prompt_len: int, max_new: int, limit: int, at_least: bool = False):
        # at_least: prompt_len is a lower bound (a text refused before it was tokenized)
        self.index, self.prompt_len, self.max_new, self.limit, self.at_least = index, prompt_len, max_new, limit, at_least
        super().__init__(self.describe("max_new_tokens") + ("; lower it" if self.param == "max_new_tokens" else
                                                             "; shorten it, lower max_new_tokens, or pass truncate=True "
                                                             "(the CLI's --truncate) to keep the newest tokens"))

    def __reduce__(self):  # Exception pickles `args` (the message), which __init__ does not take
        return type(self), (self.index, self.prompt_len, self.max_new, self.limit, self.at_least)

    @property
    def param(self) -> str:
        """The option to change: 'max_new_tokens' when it alone fills the context, else 'prompt'."""
        return "max_new_tokens" if self.max_new >= self.limit else "prompt"

    def describe(self, max_new_name: str) -> str:
        if self.param == "max_new_tokens":
            return f"{max_new_name}={self.max_new} leaves no room for a prompt in {self.limit} positions"
        n = f"at least {self.prompt_len}" if self.at_least else str(self.prompt_len)
        if self.prompt_len > self.limit:
            return f"prompt {self.index} has {n} tokens, longer than the {self.limit}-position context"
        return (f"prompt {self.index} ({n} tokens) plus {max_new_name}={self.max_new} runs past the "
                f"{self.limit}-position context")


class SchedulerClosed(Gpt2OnnxError):
    """The scheduler was closed and takes no new requests (HTTP 503: retry on another replica)."""
