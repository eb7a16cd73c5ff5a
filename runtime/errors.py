"""The exception types the CLI turns into one-line messages and the server into HTTP statuses."""


class Gpt2OnnxError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """An exception as one line for a log, a warning or a record: its type and the first line of its
    message, cut at `limit` characters (onnxruntime's messages run to many lines)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:limit] if text else ''}"


class SchedulerClosed(Gpt2OnnxError):
    """The scheduler was closed and takes no new requests (HTTP 503: retry on another replica)."""
