"""Continuous batching: many requests through one engine and one decode loop.

    sched = Scheduler(engine, SchedulerConfig(max_batch=16))
    h = sched.submit("Hello", max_new_tokens=32, do_sample=True, seed=1, stop=["\\n"])
    for tok in h: print(tok.text, end="")         # blocking iterator; `async for` works too
    h.result()                                     # or wait for the whole Result
    sched.close()                                  # finish in-flight work, refuse new requests

A thread runs the loop. Each step it (1) admits waiting requests into free slots, preferring a
slot whose cached tokens share the longest prefix with the prompt (the previous turn of a
conversation), (2) runs prompt tokens of newly admitted requests, at most `prefill_chunk` of them
while other rows are decoding, so a running row's wait for its next token stays bounded, and (3)
runs one decode step over every decoding row; a row that finishes leaves the batch that step and
its slot goes to the next waiting request. Fresh prompts admitted into adjacent slots run in one
prompt pass when padding them to the longest costs little. With `prompt_width` W > 0, the prompt
work of (2) while rows decode runs in chunks of exactly W columns, one row per pass, right-padded
(Decoder.chunk): fixed shapes, which CUDA graphs capture once per slot and replay, so a decoding row
waits a replay rather than a launch-bound prompt pass of a new shape; where the artifact has the mixed
step graph (export --mixed-step), one such chunk a step runs in the decode step's own pass
(Decoder.decode_with_chunk), every weight read once for both, so a decoding row waits one pass.
Under CUDA graphs every such pass is captured when the scheduler starts (Decoder.capture), not while
requests wait on it. A request submitted with `prompt_logprobs` has its prompt scored in the passes
that run it (each keeps every position's logits), alone and in full (no held prefix reused). The
slots are rows of the same decode core `Engine.generate` uses (decoder.py), each with its own length
and positions. A step whose rows all pick greedily takes their ids from the engine's device pick
where it has one (CUDA), not the logits.
Each request samples with its own options and generator, so its tokens do not depend on its
batch-mates where the model's logits do not: the export measures that (manifest:
parity.batch_invariance; exact in fp32 and int8 exported with `--int8-method nbits`, not in the
default int8, whose DynamicQuantizeMatMul shares one activation scale per call, nor in int4, whose
MatMulNBits kernels sum one row and many in other orders: measured so on AVX-512 VNNI and on AVX2).
A prompt's passes are split by its batch-mates (chunks, groups, held prefixes); the decoder pads a
pass whose split would change its rows' float attention (Decoder.lone_tail).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import numpy as np

from .errors import Gpt2OnnxError, SchedulerClosed, one_line
from .prompt_cache import common_prefix
from .request import SCORE_CHUNK, Request, Result, Token
from .sampling import MAX_LOGPROBS, _int

# prompt tokens one pass may run while nothing decodes (rows x width): a pass cannot be cancelled, so
# 16 fresh rows of 1,000 tokens ran as one 80-second pass on 2 cores (its clients' timeouts, disconnects
# and every new arrival waited it out, and onnxruntime's arena kept the pass's ~0.9 GB); vLLM bounds
# a step's tokens the same way (max_num_batched_tokens)
IDLE_PASS_TOKENS = 2048
# consecutive failed turns after which a scheduler calls itself failing (`health`: /health a 503, a Ray replica
# replaced) until a pass runs again: one failure may be one request's, but an engine that fails every pass will
# not recover by itself (after a sticky CUDA error every launch fails), and a server answering every request
# with a 500 while its probe says ok keeps its share of the traffic
FAILING_TURNS = 3
# while failing and idle, a one-token pass this often tells whether the engine works again: a load balancer that
# reads /health as readiness sends a failing server nothing, so only such a probe can end it
PROBE_S = 5.0
IDLE_WAKE_S = 1.0  # an idle loop wakes this often, not holding its scheduler between: a dropped one is collected
_LIVE: weakref.WeakSet = weakref.WeakSet()  # every open scheduler of this process


@atexit.register
def _close_at_exit() -> None:
    """A loop still inside onnxruntime while the interpreter finalizes aborts the process (C++'s "terminate
    called without an active exception", exit 134, whatever the exit code was meant to be): at exit every
    open scheduler cancels its requests and stops its thread first."""
    for sched in list(_LIVE):
        if sched.pid == os.getpid():
            sched.close(cancel=True)


def _seconds(timeout) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0):
        raise Gpt2OnnxError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}", param="timeout")


class QueueFull(Gpt2OnnxError):
    """The scheduler's queue is full: retry later (HTTP 429 / 503)."""


@dataclass
class SchedulerConfig:
    max_batch: int = 16  # slots: requests decoded together (each holds a KV cache of `capacity` positions)
    max_queue: int = 64  # requests waiting for a slot; one more is refused at once (QueueFull)
    # prompt tokens a step may run while other rows decode: bounds a running row's stall at about one
    # decode step plus a prompt pass of this many tokens (chosen by measurement, see the README)
    prefill_chunk: int = 64
    # > 0: while rows decode, prompts run in chunks of exactly this many columns (one row per pass,
    # right-padded; captured per slot under CUDA graphs); 0 = chunks of any length, passes of their own shape
    prompt_width: int = 0
    # with prompt_width, one chunk a step rides in the decode step's pass where the artifact has the mixed
    # step graph (export --mixed-step): a decoding row then waits one pass, not a step and a chunk pass
    mixed_step: bool = True
    capacity: int | None = None  # positions per slot (prompt + reply); None = the model's context
    keep_prefixes: bool = True  # a finished request's slot keeps its tokens for a later prompt that extends them

    def validate(self, n_positions: int) -> None:
        _int(self.max_batch, "max_batch", 1, 4096)
        _int(self.max_queue, "max_queue", 0)
        _int(self.prefill_chunk, "prefill_chunk", 1)
        if self.capacity is not None:
            _int(self.capacity, "capacity", 2, n_positions, hint=" (the model's context)")
        _int(self.prompt_width, "prompt_width", 0)
        if self.mixed_step not in (True, False):
            raise Gpt2OnnxError(f"mixed_step must be true or false, got {self.mixed_step!r}")
        if 2 * self.prompt_width > (cap := self.capacity or n_positions):
            raise Gpt2OnnxError(f"prompt_width must be at most half a slot's {cap} positions, got {self.prompt_width}")


class Slot:
    """One row of the batch: the tokens its KV cache holds, and the request using it (if any)."""

    def __init__(self, index: int):
        self.index = index
        self.tokens: list[int] = []  # ids whose keys and values are in this row of the cache
        self.req: Request | None = None
        self.used = 0.0  # when its last request ended (least recently used is evicted first)


class Scheduler:
    """Runs requests through one engine with continuous batching (see the module docstring)."""

    def __init__(self, engine, config: SchedulerConfig | None = None):
        if config is not None and not isinstance(config, SchedulerConfig):
            raise Gpt2OnnxError(f"config must be a SchedulerConfig, got {type(config).__name__}; "
                                "e.g. Scheduler(engine, SchedulerConfig(max_batch=16))")
        self.engine = engine
        self.config = cfg = config or SchedulerConfig()
        cfg.validate(engine.n_positions)
        self.capacity = cfg.capacity or engine.n_positions
        # written once now: a long-lived cache whose first prompts should not pay page faults
        # with a prompt width, a prompt chunk may ride in the decode step's pass (the artifact's mixed step graph)
        self.kv = engine.decoder(cfg.max_batch, self.capacity, prefault=True, mixed=cfg.prompt_width > 0 and cfg.mixed_step)
        self.kv.capture(cfg.prompt_width)  # under CUDA graphs: every pass's graph now, not while requests wait
        self._tokens = np.zeros(cfg.max_batch, np.int64)  # a step's input token per slot
        self._live = np.zeros(cfg.max_batch, bool)  # which slots decode this step (the others idle)
        self.slots = [Slot(i) for i in range(cfg.max_batch)]
        self.waiting: deque[Request] = deque()
        self.running: list[Slot] = []  # admission order
        self.closed = False
        self.stopped: str | None = None  # why the loop's thread ended by an error (it then refuses requests)
        self.failing: str | None = None  # why its last FAILING_TURNS turns failed, until a pass runs again
        self._failures = 0  # turns failed since a pass last ran
        self._passes = 0  # prompt and decode passes run (a turn may run none: its rows all cancelled)
        self._probed = 0.0  # when an idle failing scheduler last probed its engine (time.monotonic)
        self.counters = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "steps": 0,
                         "refused": 0, "cancelled": 0, "errors": 0}
        self.cv = threading.Condition()
        self.pid = os.getpid()
        self.thread = threading.Thread(target=Scheduler._loop, args=(weakref.ref(self),), name="gpt2onnx-scheduler", daemon=True)
        self.thread.start()
        _LIVE.add(self)

    # ---- the caller's side -----------------------------------------------------------------

    def submit(self, prompt: str | list[int], *, index: int = 0, prompt_logprobs: int | None = None, **kw) -> Handle:
        """Queue a request (text or token ids; GenerationConfig fields as keywords) and return its
        Handle at once. `index`: which of the caller's prompts this is (its errors name it, as
        generate's do). `prompt_logprobs` k: the prompt's tokens scored as its passes run, each with its
        log-probability and k alternatives (as Engine.score's; Result.prompt_logprobs, and the
        request's `prompt_scores` once its first token is out): one pass over the prompt serves both
        the scores and the generation (vLLM's prompt_logprobs). Such a prompt runs in full (no held
        prefix is reused) and alone (not in a shared or fixed-width pass); with max_new_tokens=0 it is
        only scored (OpenAI's echo with max_tokens 0): it ends after its prompt pass, no token, finish
        reason "length", and needs only its prompt to fit. Raises Gpt2OnnxError for a bad request,
        QueueFull when the queue is full, and Gpt2OnnxError after close()."""
        if prompt_logprobs is not None:
            _int(prompt_logprobs, "prompt_logprobs", 0, MAX_LOGPROBS)
        # max_new_tokens 0 with prompt_logprobs: scored only (without, validation refuses it as anywhere else)
        score_only = prompt_logprobs is not None and kw.get("max_new_tokens") == 0 and not isinstance(kw.get("max_new_tokens"), bool)
        cfg = self.engine.config(**{**kw, "max_new_tokens": 1} if score_only else kw)
        req = self.engine.request(prompt, cfg, limit=self.capacity, index=index, prompt_logprobs=prompt_logprobs,
                                  score_only=score_only)
        with self.cv:
            if self.pid != os.getpid():
                raise SchedulerClosed("this scheduler was made in another process (before a fork): its loop runs there; "
                                      "make the Scheduler in this process")
            if self.closed:
                raise SchedulerClosed(f"{self.stopped}; it takes no new requests" if self.stopped
                                      else "the scheduler is shut down and takes no new requests")
            if len(self.waiting) + len(self.running) >= len(self.slots) + self.config.max_queue:
                self.counters["refused"] += 1
                raise QueueFull(f"the queue is full ({self.config.max_queue} waiting, its max_queue); retry later")
            self.waiting.append(req)
            self.counters["requests"] += 1
            self.cv.notify_all()
        return Handle(req, self)

    def cancel(self, req: Request) -> None:
        """Stop a request: a waiting one leaves the queue now, a running one frees its slot at the next step."""
        with self.cv:
            if req.done:
                return
            req.cancelled = True
            if req in self.waiting:
                self.waiting.remove(req)
                req.end("cancelled")
                self.counters["cancelled"] += 1
            self.cv.notify_all()

    def close(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Refuse new requests, then finish the accepted ones (or cancel them with cancel=True, or
        those still unfinished after `timeout` seconds) and stop the loop's thread."""
        _seconds(timeout)
        if self.pid != os.getpid():  # a copy made by fork(): the loop's thread and its requests stayed in the parent
            return
        with self.cv:
            self.closed = True
            if cancel:
                self._cancel_all()
            self.cv.notify_all()
        self.thread.join(timeout)
        if self.thread.is_alive():
            with self.cv:
                self._cancel_all()
                self.cv.notify_all()
            self.thread.join()
        self.kv.close()  # the KV cache goes now, not when the last reference to the scheduler does

    def _cancel_all(self) -> None:
        for req in self.waiting:
            req.end("cancelled")
        self.counters["cancelled"] += len(self.waiting)
        self.waiting.clear()
        for s in self.running:
            s.req.cancelled = True

    def __enter__(self) -> Scheduler:
        return self

    def __reduce__(self):
        raise TypeError("a Scheduler runs its loop in this process and cannot be pickled; pass the Engine (or its "
                        "artifact path) and make a Scheduler in the other process")

    def __exit__(self, exc_type, *exc) -> None:
        self.close(cancel=exc_type is not None)  # leaving on an error: what was accepted is not waited for

    def __del__(self) -> None:
        """Dropped without close() (the loop's thread holds it only weakly): its requests are gone with
        their handles, so only the KV cache is left to free."""
        kv = getattr(self, "kv", None)
        if kv is not None and getattr(self, "pid", None) == os.getpid():
            self.closed = True
            kv.close()

    def metrics(self) -> dict:
        """Queue and batch occupancy and totals since start (for /metrics)."""
        with self.cv:
            held = sum(1 for s in self.slots if s.req is None and s.tokens)
            return {"waiting": len(self.waiting), "running": len(self.running), "slots": len(self.slots),
                    "held_prefixes": held, **self.counters}

    # ---- the loop --------------------------------------------------------------------------

    @staticmethod
    def _loop(ref: weakref.ref) -> None:
        """The loop's thread holds its scheduler only during a turn: one dropped without close() is
        collected (its finalizer frees the KV cache) and the thread ends."""
        while (sched := ref()) is not None and sched._turn():
            del sched

    def _turn(self) -> bool:
        """One step of the loop (or an idle second); False once the loop is over."""
        try:
            with self.cv:
                if not self.waiting and not self.running and not self.closed:
                    if self.failing and time.monotonic() - self._probed >= PROBE_S:
                        self._probe()
                    else:
                        self.cv.wait(min(IDLE_WAKE_S, PROBE_S))
                    return True
                if self.closed and not self.waiting and not self.running:
                    return False
                failed, passes = None, self._passes
                try:
                    self._admit()
                except Exception as e:  # noqa: BLE001 - a slot's reset failed: as a failed step
                    self._fail_running(e)
                    failed = e
            try:
                self._step()
            except Exception as e:  # an onnxruntime failure: fail the running requests, keep serving
                with self.cv:
                    self._fail_running(e)
                failed = e
            self._count(failed, self._passes != passes)
            return True
        except BaseException as e:  # the loop cannot go on: refuse new requests, end every accepted one
            with self.cv:
                self.stopped = f"the scheduler stopped ({one_line(e)})"
                self.closed = True
                self._fail_running(e)
                for req in self.waiting:
                    req.end("error", self.stopped)
                self.waiting.clear()
            # a bug, not a request's fault: its traceback goes to the log (the server's /health now fails)
            logging.getLogger("gpt2onnx").error("%s", self.stopped, exc_info=True)
            return False

    @property
    def health(self) -> str | None:
        """None while it serves; else why not: its loop stopped, or its engine fails every pass (`failing`)."""
        return self.stopped or self.failing

    def _count(self, failed: Exception | None, ran: bool) -> None:
        """After a turn: a pass that ran ends `failing`; FAILING_TURNS failed turns in a row with no pass between
        start it."""
        if ran:
            if self.failing:
                logging.getLogger("gpt2onnx").warning("the scheduler's passes run again; it serves")
            self._failures, self.failing = 0, None
        if failed is None:
            return
        self._failures += 1
        if self._failures >= FAILING_TURNS:
            if self.failing is None:
                logging.getLogger("gpt2onnx").error("the scheduler is failing: %d turns in a row failed, the last with %s", self._failures, one_line(failed))
            self.failing = f"its last {self._failures} turns failed, the last with: {one_line(failed)}"

    def _probe(self) -> None:
        """Idle and failing (under the lock): one token through the least recently used slot (emptied before
        and after: what it held may be half-written); a pass that runs ends `failing`, one that fails keeps it."""
        self._probed = time.monotonic()
        s = min(self.slots, key=lambda s: (s.used, s.index))
        s.tokens = []
        try:
            self.kv.truncate(s.index, 0)
            self.kv.prefill(s.index, [[self.engine.pad_token_id]])
            self.kv.truncate(s.index, 0)
        except Exception as e:  # noqa: BLE001 - still failing
            logging.getLogger("gpt2onnx").debug("the scheduler's probe failed: %s", one_line(e))
            return
        self._count(None, True)

    def _fail_running(self, e: BaseException) -> None:
        """End every running request with `e` (under the lock); their rows' caches may be half-written."""
        msg = one_line(e)
        for s in self.running:
            s.tokens = []
            self.counters["errors"] += 1
            self._release(s, "error", msg)
        self.running.clear()

    def _admit(self) -> None:
        """Waiting requests into free slots (under the lock): the slot sharing the longest prefix
        with the prompt, else an empty one, else the least recently used held one."""
        free = [s for s in self.slots if s.req is None]
        while self.waiting and free:
            req = self.waiting.popleft()
            best, reuse = None, 0
            if self.config.keep_prefixes and req.prompt_scores is None:  # a scored prompt runs every token
                for s in free:
                    p = min(common_prefix(s.tokens, req.ids), len(req.ids) - 1)  # at least one token must run
                    if p > reuse:
                        best, reuse = s, p
            if best is None:
                best = min(free, key=lambda s: (bool(s.tokens), s.used, s.index))
            free.remove(best)
            best.req = req
            self.running.append(best)  # first: should the reset below fail, the request fails with the running ones
            del best.tokens[reuse:]
            self.kv.truncate(best.index, reuse)
            req.stats.cached_tokens = reuse
            self.counters["prompt_tokens"] += len(req.ids)
            self.counters["cached_tokens"] += reuse

    def _step(self) -> None:
        """Drop cancelled rows, run bounded prompt work, then one decode step."""
        for s in [s for s in self.running if s.req.cancelled]:
            self._retire(s, "cancelled")
        riding = self._prefill()  # (slot, chunk) to run in the step's pass, or None
        rows = [s for s in self.running if s.req.tokens]  # prompt done, first token sampled
        n = 1 + max((s.index for s in rows), default=-1)  # the step runs slots 0..n-1; the ones not decoding idle
        w = self.config.prompt_width
        if riding and not (rows and self.kv.can_mix(riding[0].index, w, n)):
            t = time.perf_counter()  # no pass to ride in: a chunk pass of its own
            self._took(riding[0], riding[1], self.kv.chunk(riding[0].index, riding[1], w), time.perf_counter() - t)
            riding = None
        if not rows:
            return
        tokens, live = self._tokens[:n], self._live[:n]
        tokens[:], live[:] = self.engine.pad_token_id, False
        for s in rows:
            tokens[s.index], live[s.index] = s.req.tokens[-1], True
            s.tokens.append(s.req.tokens[-1])
        greedy = all(s.req.greedy for s in rows)  # ids [n] (taken on the device where the decoder has a pick)
        t = time.perf_counter()
        if riding:  # the step and the chunk in one pass of the mixed graph
            slot, chunk = riding  # its logits are needed (copied) only when the chunk ends its prompt
            last = len(slot.tokens) + len(chunk) == len(slot.req.ids)
            out, chunk_logits = self.kv.decode_with_chunk(tokens, live, slot.index, chunk, w, greedy, last)
        else:
            out = self.kv.decode_greedy(tokens, live) if greedy else self.kv.decode(tokens, live)  # else logits [n, vocab]
        dt = time.perf_counter() - t
        self.counters["steps"] += 1
        self._passes += 1
        for s in rows:
            s.req.stats.step_s.append(dt)
            s.req.stats.decode_s += dt
            self._emit(s, out[s.index])
        if riding:
            self._took(riding[0], riding[1], chunk_logits, dt)

    def _prefill(self) -> tuple[Slot, list[int]] | None:
        """Run prompt tokens of admitted requests in admission order: all of them while nothing
        decodes, else at most `prefill_chunk` this step. With the mixed step graph, the first fixed-width
        chunk is not run here but returned, (slot, chunk), to run inside the decode step's pass."""
        budget = None if not any(s.req.tokens for s in self.running) else self.config.prefill_chunk
        pending = [s for s in self.running if not s.req.tokens]
        fresh = {s.index: s for s in pending if not s.tokens and s.req.prompt_scores is None}  # nothing held: may share a pass
        riding = None
        for s in pending:
            if s.req is None or s.req.tokens:  # ran in an earlier group of this loop (and may have ended)
                continue
            if s.req.cancelled:  # between passes too: a client gone (or its timeout) frees its slot now
                fresh.pop(s.index, None)
                self._retire(s, "cancelled")
                continue
            if budget is not None and budget <= 0:
                return riding
            w, scores = self.config.prompt_width, s.req.prompt_scores
            fixed = budget is not None and w and self.kv.fits(s.index, w) and scores is None  # a captured chunk of exactly w columns
            group = self._group(s, fresh, budget or IDLE_PASS_TOKENS) if not s.tokens and not fixed and scores is None else [s]
            if fixed:
                chunks = [s.req.ids[len(s.tokens):][:w]]
                if self.kv.mixed is not None and riding is None:  # rides in this step's pass
                    riding = (s, chunks[0])
                    budget -= w
                    continue
            t = time.perf_counter()
            if fixed:
                logits, ran = [self.kv.chunk(s.index, chunks[0], w)], w
            elif len(group) > 1:
                logits, ran = self.kv.prefill(s.index, [g.req.ids for g in group]), max(len(g.req.ids) for g in group) * len(group)
                chunks = [g.req.ids for g in group]
            elif scores is not None:  # every position's logits, SCORE_CHUNK at most a pass: [chunk, vocab]
                chunks = [s.req.ids[len(s.tokens):][: min(budget or SCORE_CHUNK, SCORE_CHUNK)]]
                every = self.kv.prefill(s.index, chunks, every=True)
                scores.add(len(s.tokens), every)
                logits, ran = every[-1:], len(chunks[0])
            else:
                todo = s.req.ids[len(s.tokens):]
                chunks = [todo[: budget or IDLE_PASS_TOKENS]]
                logits, ran = self.kv.prefill(s.index, chunks), len(chunks[0])
            dt = time.perf_counter() - t
            started = False
            for g, chunk, lg in zip(group, chunks, logits):
                fresh.pop(g.index, None)
                started |= self._took(g, chunk, lg, dt)
            if budget is not None:
                budget -= ran
            elif started:  # a row decodes now: bound what the rest may add to its wait
                budget = self.config.prefill_chunk
        return riding

    def _took(self, s: Slot, chunk: list[int], logits: np.ndarray, dt: float) -> bool:
        """Row s's cache took `chunk` of its prompt (its last token's logits [vocab]); when that completes the
        prompt, its first token is chosen. Returns whether it was."""
        s.req.stats.prefill_s += dt
        s.tokens += chunk
        self._passes += 1
        if len(s.tokens) < len(s.req.ids):
            return False
        if s.req.score_only:  # max_new_tokens 0: its prompt scored, the request is done
            if len(s.tokens) >= self.kv.capacity:  # a held row must leave a column: steps write one in every row
                del s.tokens[self.kv.capacity - 1:]
                self.kv.truncate(s.index, len(s.tokens))
            self._retire(s, "length")
            return False
        self._emit(s, logits)  # the whole prompt is in: its first token
        return True

    def _group(self, s: Slot, fresh: dict[int, Slot], budget: int) -> list[Slot]:
        """`s` and the fresh rows in the slots right after it that can share its prompt pass: right-padded
        to the longest (a row's padding lands after its tokens, where its reply overwrites it), within the
        budget, wasting at most a quarter of the pass on padding."""
        group = [s]
        while (nxt := fresh.get(group[-1].index + 1)) is not None:
            lens = [len(g.req.ids) for g in group] + [len(nxt.req.ids)]
            width, rows = max(lens), len(lens)
            if width * rows > budget or width * rows > 1.25 * sum(lens):
                break
            group.append(nxt)
        return group

    def _emit(self, s: Slot, out: np.ndarray) -> None:
        """A row's next token from its logits [vocab] or its device-picked id (0-d), counted before `take`
        publishes it: a client that has its last token finds it in /metrics."""
        self.counters["generated_tokens"] += 1
        s.req.take(out)
        if s.req.done:
            self._retire(s, s.req.finish_reason)

    def _retire(self, s: Slot, reason: str) -> None:
        with self.cv:
            self.counters["cancelled"] += reason == "cancelled"
            self.running.remove(s)
            self._release(s, reason)
            self.cv.notify_all()

    def _release(self, s: Slot, reason: str, error: str | None = None) -> None:
        s.req.end(reason, error)
        s.req, s.used = None, time.perf_counter()
        if not self.config.keep_prefixes:
            s.tokens = []


class Handle:
    """The caller's side of one request: iterate it (blocking or `async for`) for Token events as
    they are produced, or wait for the whole `result()`. Leaving an iteration early, or dropping
    the handle, cancels the request and frees its slot."""

    def __init__(self, req: Request, sched: Scheduler):
        self.request = req
        self._sched = sched
        weakref.finalize(self, sched.cancel, req)

    @property
    def done(self) -> bool:
        return self.request.done

    def cancel(self) -> None:
        self._sched.cancel(self.request)

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the request to end. Raises Gpt2OnnxError if it failed or `timeout` passed."""
        _seconds(timeout)
        req = self.request
        with req.cv:
            if not req.cv.wait_for(lambda: req.done, timeout):
                raise Gpt2OnnxError(f"the request did not finish within {timeout} s")
        return self._checked()

    def _checked(self) -> Result:
        res = self.request.result()
        if res.finish_reason == "error":
            raise Gpt2OnnxError(f"generation failed: {res.error}")
        return res

    def __iter__(self) -> Iterator[Token]:
        req, i = self.request, 0
        try:
            while True:
                with req.cv:
                    req.followers += 1
                    req.cv.wait_for(lambda n=i: len(req.events) > n or req.done)
                    req.followers -= 1
                    new, done = req.events[i:], req.done
                i += len(new)
                yield from new
                if done and i >= len(req.events):
                    self._checked()
                    return
        finally:
            if not req.done:
                self.cancel()  # the consumer went away

    async def __aiter__(self) -> AsyncIterator[Token]:
        req, i = self.request, 0
        loop, ready = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        with req.cv:
            req.wakers.append(wake)
        try:
            while True:
                ready.clear()  # before reading: a token published after the read sets it again
                with req.cv:
                    new, done = req.events[i:], req.done
                i += len(new)
                for ev in new:
                    yield ev
                if done and i >= len(req.events):
                    self._checked()
                    return
                if not new:
                    await ready.wait()
        finally:
            with req.cv:
                req.wakers.remove(wake)
            if not req.done:
                self.cancel()

    async def wait(self) -> Result:
        """The whole result, awaited without blocking the event loop."""
        async for _ in self:
            pass
        return self._checked()
