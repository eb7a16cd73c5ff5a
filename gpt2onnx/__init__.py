"""gpt2onnx: GPT-2 / DialoGPT on ONNX Runtime. `main` is the `gpt2onnx` command; it imports nothing but
the standard library until it runs, so a Ctrl-C while the CLI's modules load (numpy, the runtime: ~0.3 s
of every start) or its parser is built ends as one later does: one line, exit 130, no traceback."""

from __future__ import annotations

import sys


def interrupted(e: BaseException | None) -> bool:
    """Whether `e` is, or was raised while handling, a KeyboardInterrupt (a C extension's import wraps
    one landing inside it in an ImportError)."""
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__cause__ or e.__context__
    return False


def warning_line(message, *args, **kw) -> str:
    """warnings.formatwarning for gpt2onnx's processes (the CLI and the benchmark's workers): one line
    saying whose warning it is, not Python's file:line and source."""
    return f"gpt2onnx: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    try:
        from gpt2onnx.cli import main as run

        return run(argv)  # which handles a Ctrl-C once the command runs; this one, one while it is being built
    except BaseException as e:
        if not interrupted(e):
            raise
        print("gpt2onnx: interrupted", file=sys.stderr)
        return 130
