"""The exception types the CLI turns into one-line messages and the server into HTTP statuses."""


class Gpt2OnnxError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


class SchedulerClosed(Gpt2OnnxError):
    """The scheduler was closed and takes no new requests (HTTP 503: retry on another replica)."""
