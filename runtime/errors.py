"""The one exception type the CLI turns into a one-line message."""


class Gpt2OnnxError(Exception):
    """A user-facing error: the message says what is wrong and what to do."""
