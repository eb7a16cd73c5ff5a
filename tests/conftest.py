"""Shared fixtures and helpers: the tiny synthetic checkpoint, its exported artifacts, prompts, and
the CLI run as a user runs it. Test modules import helpers from here, never from each other.

Exports are session-scoped: each costs a few seconds and many tests read the same artifact.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2onnx.export import checkpoints
from gpt2onnx.export.convert import ExportOptions, export

QUIET = lambda *_: None  # noqa: E731
# token-id prompts of different lengths (a left-padded batch); the last holds an EOS mid-prompt
PROMPTS = [[464, 2068, 7586, 21831, 18045, 625, 262], [15496, 11, 703], [40, 1101, 257, 3303, 13, 314, 588, 340, 13, 50256, 2]]


@pytest.fixture(scope="session")
def tiny():
    return checkpoints.load("synthetic:tiny")


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return export(ExportOptions("synthetic:tiny", str(tmp_path_factory.mktemp("art") / "tiny")), log=QUIET)


@pytest.fixture(scope="session")
def tiny_mixed_artifact(tmp_path_factory):
    """The tiny export with the mixed step graph (export --mixed-step)."""
    return export(ExportOptions("synthetic:tiny", str(tmp_path_factory.mktemp("art") / "tiny-mixed"), mixed=True), log=QUIET)


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


def extended_vs_fresh(engine, steps: int = 3) -> float:
    """Max |logit difference| between a prompt pass that extends a held row (a prompt, 3 decode steps,
    then 4 more tokens) and a fresh prompt pass over the same tokens, and over `steps` decode steps
    after each."""
    dec, logits = prefilled(engine, PROMPTS[:1], 8, capacity=engine.n_positions)
    row = list(PROMPTS[0])
    for _ in range(3):
        row.append(int(logits.argmax()))
        logits = dec.decode(logits.argmax(-1))
    row += [int(logits.argmax())] + PROMPTS[1][:3]
    held = int(dec.held[0])
    assert held == len(PROMPTS[0]) + 3
    a = dec.prefill(0, [row[held:]])
    fresh, b = prefilled(engine, [row], 8)
    assert dec.held[0] == fresh.held[0] == len(row)
    diff = float(np.abs(a - b).max())
    for _ in range(steps):
        t = b.argmax(-1)
        a, b = dec.decode(t), fresh.decode(t)
        diff = max(diff, float(np.abs(a - b).max()))
    return diff


def captured(path: str, device_pick: bool | None = None, mixed_step: bool | None = None):
    """An engine on the CPU whose decode core takes the CUDA-graph code path (fixed-address buffers per
    batch bucket, session-wide graph ids in the run options, which the CPU provider ignores); with
    `device_pick`, greedy's pick runs as its own session as on CUDA (its graph ids as well); with
    `mixed_step`, the mixed step graph's session likewise."""
    import dataclasses

    from gpt2onnx.runtime import Engine

    e = Engine.load(path, provider="cpu", device_pick=device_pick, mixed_step=mixed_step)
    return Engine(e.manifest, e.session, e.tokenizer, e.provider, dataclasses.replace(e.session_config, cuda_graph=True),
                  e.pick.session if e.pick else None)


def run_cli(*args: str, input: str | bytes | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed CLI the way a user does; returns the completed process (text or bytes)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "gpt2onnx", *args], input=input, capture_output=True,
                          text=not isinstance(input, bytes), timeout=timeout, env=env)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """A refused CLI call: exit status 2, one 'gpt2onnx: error:' line on stderr holding every needle,
    no traceback. Returns that line."""
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpt2onnx: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
