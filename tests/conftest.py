"""Shared fixtures: the tiny synthetic checkpoint, its Hugging Face directory and exported artifacts.

Exports are session-scoped: each costs a few seconds and many tests read the same artifact.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gpt2onnx.export import checkpoints
from gpt2onnx.export.convert import ExportOptions, export

QUIET = lambda *_: None  # noqa: E731


@pytest.fixture(scope="session")
def tiny():
    return checkpoints.load("synthetic:tiny")


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return export(ExportOptions("synthetic:tiny", str(tmp_path_factory.mktemp("art") / "tiny")), log=QUIET)


@pytest.fixture(scope="session")
def tiny_plain_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny-plain"
    return export(ExportOptions("synthetic:tiny", str(out), fuse=False), log=QUIET)


@pytest.fixture(scope="session")
def engine(tiny_artifact):
    from gpt2onnx.runtime import Engine

    return Engine.load(tiny_artifact, provider="cpu")


def prefilled(engine, rows: list[list[int]], new_tokens: int, capacity: int | None = None):
    """A decode core of len(rows) rows after its prompt pass, and the last logits [rows, vocab]."""
    dec = engine.decoder(len(rows), capacity or max(map(len, rows)) + new_tokens)
    return dec, dec.prefill(0, rows)


def captured(path: str):
    """An engine on the CPU whose decode core takes the CUDA-graph code path (fixed-address buffers per
    batch bucket, session-wide graph ids in the run options, which the CPU provider ignores)."""
    import dataclasses

    from gpt2onnx.runtime import Engine

    e = Engine.load(path, provider="cpu")
    return Engine(e.manifest, e.session, e.tokenizer, e.provider, dataclasses.replace(e.session_config, cuda_graph=True))


def run_cli(*args: str, input: str | bytes | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed CLI the way a user does; returns the completed process (text or bytes)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "gpt2onnx.cli", *args], input=input, capture_output=True,
                          text=not isinstance(input, bytes), timeout=timeout, env=env)
