"""The worker protocol: every system under measurement is served by its own process, which loads it
once and answers timing requests over a pipe.

One process per system gives each its own peak-memory figure (the runtime's worker never imports
torch) and lets the harness interleave systems request by request (A B A B) so drift hits all of
them alike. Requests (a dict with "kind"):

- `generate` {batch, prompt_len, new_tokens} -> {ttft_s, step_s (each decode step after the first
  token), total_s, tokens (the new ids of each row: exactly the number asked, EOS never ends a row
  early)}; prompts from workloads.prompt_rows;
- `chat` {turns, user_len, reply_len} -> {turns: [{prompt_len, ttft_s, step_s, total_s, cached_tokens}]};
- `concurrent` {mode, clients, requests, prompt_len, reply_len, reply_cap, max_batch} -> {requests:
  one record per request {prompt_len, new_tokens, submitted_s, token_s}} (clients.run_clients);
- `memory` -> {peak_rss_mb, gpu_peak_mb?, gpu_used_mb?};
- `stop`.
The first message is the load report: {load_s, threads, **the runner's info()}. Any failure is
answered as {error: "ExceptionType: first line of its message"}.

The runners live in engines/ (one module per engine); each offers info(), generate(rows, n),
new_conversation(), reply(history, n), concurrent(mode, clients, requests, max_batch), gpu_memory().
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import threading
import time
from dataclasses import dataclass

from gpt2onnx.runtime.session import physical_cores

from . import memory
from .workloads import concurrent_requests, prompt_rows, run_chat


@dataclass(frozen=True)
class SystemSpec:
    name: str  # row label in the report: "ours fp32 cpu", "pytorch fp32", "optimum fp32"
    kind: str  # ours | pytorch | pytorch-compile | optimum | llamacpp | ctranslate2
    # artifact dir (ours), HF checkpoint dir (pytorch, pytorch-compile), optimum export dir (optimum), GGUF file (llamacpp),
    # CTranslate2 model dir (ctranslate2)
    path: str
    provider: str = "cpu"  # cpu | cuda
    threads: int = 0  # 0 = one per core
    precision: str = "fp32"


class WorkerDied(Exception):
    """A system's worker process ended without answering (a crash inside a native library)."""


class WorkerError(RuntimeError):
    """A system's worker answered with an error: "NAME: ExceptionType: first line of its message"."""


class Worker:
    """Parent-side handle: `request(kind, **args) -> dict`, `close()`. Raises WorkerDied when the
    process dies mid-request (a segfault in a baseline's native code must not end the whole run), and
    WorkerError when it answers with an error (the harness drops such a baseline, as a dead one)."""

    def __init__(self, spec: SystemSpec):
        ctx = mp.get_context("spawn")  # a clean interpreter: no torch inherited by the runtime's worker
        self.spec = spec
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(spec, child), daemon=True)
        with _sigint_ignored():  # a Ctrl-C reaches the whole process group: the parent alone answers it
            self.proc.start()
        self.loaded = self._recv()

    def _recv(self) -> dict:
        try:
            msg = self.conn.recv()
        except (EOFError, ConnectionResetError):
            self.proc.join(timeout=10)
            code = self.proc.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise WorkerDied(f"its process died ({how})") from None
        if "error" in msg:
            raise WorkerError(f"{self.spec.name}: {msg['error']}")
        return msg

    def request(self, kind: str, **args) -> dict:
        try:
            self.conn.send({"kind": kind, **args})
        except (BrokenPipeError, OSError):
            pass  # already dead: _recv says how
        return self._recv()

    def close(self) -> None:
        try:
            self.conn.send({"kind": "stop"})
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored while a worker starts: an ignored signal stays ignored across exec, and Python keeps it
    so (it installs its KeyboardInterrupt handler only over the default), so a terminal's Ctrl-C, sent to
    the whole process group, ends the run through the parent ("interrupted", exit 130) without a
    KeyboardInterrupt traceback from every worker. The parent's daemon workers end with it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _serve(spec: SystemSpec, conn) -> None:
    import warnings

    from gpt2onnx import warning_line

    from .engines import runner_class

    warnings.formatwarning = warning_line  # as the CLI's: this is a spawned interpreter of its own
    try:
        threads = spec.threads or physical_cores()
        t = time.perf_counter()
        runner = runner_class(spec.kind)(spec, threads)
        conn.send({"load_s": time.perf_counter() - t, "threads": threads, **runner.info()})
    except Exception as e:  # reported to the parent as one line
        conn.send({"error": _one_line(e)})
        return
    while True:
        msg = conn.recv()
        kind = msg.pop("kind")
        if kind == "stop":
            return
        try:
            if kind == "generate":
                rows = prompt_rows(msg["batch"], msg["prompt_len"], runner.vocab)
                conn.send(runner.generate(rows, msg["new_tokens"]))
            elif kind == "chat":
                conn.send(run_chat(runner, msg["turns"], msg["user_len"], msg["reply_len"]))
            elif kind == "concurrent":
                reqs = concurrent_requests(msg["requests"], msg["prompt_len"], msg["reply_len"], runner.vocab)
                reqs = [(p, min(n, msg["reply_cap"] or n)) for p, n in reqs]  # the warm-up caps replies
                conn.send({"requests": runner.concurrent(msg["mode"], msg["clients"], reqs, msg["max_batch"])})
            elif kind == "memory":
                conn.send({"peak_rss_mb": memory.status()["VmHWM"], **runner.gpu_memory()})
            else:
                conn.send({"error": f"unknown request {kind}"})
        except Exception as e:
            conn.send({"error": _one_line(e)})
