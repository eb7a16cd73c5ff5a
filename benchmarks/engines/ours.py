"""Ours: an artifact through the runtime, in every concurrent mode (the continuous-batching
scheduler, the same behind `gpt2onnx serve`'s HTTP app, a lock around `generate`, static batches)."""

from __future__ import annotations

import functools
import queue
import threading
import time

import numpy as np

from ..clients import SerialClients, check_reply, run_clients, served, token_times
from ..machine import nvidia_smi_mb
from ..worker import SystemSpec

# Static batching gathers what arrives this long after the first waiting request: closed-loop
# clients whose requests were in the last batch re-submit within microseconds of its end.
STATIC_WINDOW_S = 0.005


class Ours(SerialClients):
    def __init__(self, spec: SystemSpec, threads: int):
        from gpt2onnx.runtime import Engine
        from gpt2onnx.runtime.artifact import load_manifest

        # mode mixedW measures the mixed step graph on every provider where the artifact has one (built at
        # its first use; the runtime's default takes it on CUDA only)
        mixed = "mixed" in load_manifest(spec.path, verify="size").raw["io"] or None
        self.engine = Engine.load(spec.path, provider=spec.provider, threads=threads, verify="size", mixed_step=mixed)
        self.vocab, self.eos = self.engine.vocab_size, self.engine.eos_token_id
        self.cache = None

    def info(self) -> dict:
        m = self.engine.manifest.raw
        # cuda_graph: whether onnxruntime accepted enable_cuda_graph for this session (False on the cpu provider);
        # device_pick: greedy's argmax ran on the device (pick.onnx) in steps of 4 rows or more
        return {"provider": self.engine.provider, "weights": m.get("weights", {}), "manifest": m,
                "cuda_graph": bool(self.engine.session_config.cuda_graph), "device_pick": self.engine.pick is not None,
                "kv_cache": m["io"]["kv"]["dtype"]}

    def generate(self, rows, new_tokens: int) -> dict:
        t = time.perf_counter()
        out = self.engine.generate(rows, max_new_tokens=new_tokens, eos_token_id=-1)
        total = time.perf_counter() - t
        s = self.engine.stats
        return {"ttft_s": s.ttft_s, "step_s": s.step_s, "total_s": total, "tokens": [list(map(int, o)) for o in out]}

    def new_conversation(self) -> None:
        from gpt2onnx.runtime import PromptCache

        self.cache = PromptCache()  # what engine.chat() keeps: each turn runs only its new tokens

    def reply(self, history: list[int], new_tokens: int) -> tuple[dict, list[int]]:
        t = time.perf_counter()
        new = self.engine.generate([history], cache=self.cache, max_new_tokens=new_tokens, eos_token_id=-1)[0]
        total = time.perf_counter() - t
        s = self.engine.stats
        return {"ttft_s": s.ttft_s, "step_s": s.step_s, "total_s": total, "cached_tokens": s.cached_tokens}, new

    def gpu_memory(self) -> dict:
        return nvidia_smi_mb() if self.engine.device == "cuda" else {}

    # ---- concurrent clients: mode scheduler | chunkedW | mixedW | http | serial | static --------

    def concurrent(self, mode: str, clients: int, requests, max_batch: int) -> list[dict]:
        if mode == "scheduler":
            return self._scheduled(clients, requests, max_batch)
        if mode.startswith("chunked"):  # chunkedW: the scheduler with fixed W-column prompt chunks, each a pass
            return self._scheduled(clients, requests, max_batch, prompt_width=int(mode[len("chunked"):]), mixed=False)
        if mode.startswith("mixed"):  # mixedW: the same chunks, one a step riding in the step's pass (mixed.onnx)
            if self.engine._mixed() is None:
                raise RuntimeError("mode mixed needs an artifact exported with --mixed-step")
            return self._scheduled(clients, requests, max_batch, prompt_width=int(mode[len("mixed"):]))
        if mode == "static":
            return self._static(clients, requests, max_batch)
        if mode == "http":
            return self._http(clients, requests, max_batch)
        return super().concurrent(mode, clients, requests, max_batch)

    def _http(self, clients: int, requests, max_batch: int) -> list[dict]:
        """The scheduler behind `gpt2onnx serve`'s app, in this process on a loopback port; clients
        stream /v1/completions over HTTP and stamp each token's SSE chunk as it arrives, so the
        difference from mode `scheduler` is what HTTP, JSON and SSE cost."""
        import httpx

        from gpt2onnx.serve.app import Model, build_app
        from gpt2onnx.serve.config import ServeConfig

        sched = self._scheduler(max_batch, clients)
        app = build_app([Model("m", self.engine, sched, 0)], ServeConfig(max_tokens=self.engine.n_positions - 1, request_timeout_s=3600))
        with served(app) as base, httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=clients + 4)) as http:
            return run_clients(functools.partial(self._stream, http, base + "/v1/completions"), requests, clients)

    @staticmethod
    def _stream(http, url: str, prompt: list[int], n: int) -> tuple[float, list[float]]:
        """One streamed completion of `n` tokens; returns (submitted_s, each token's arrival stamp)."""
        import json

        submitted, stamps = time.perf_counter(), []
        body = {"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
        with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["finish_reason"] is None:  # one chunk per token
                        stamps.append(time.perf_counter())
        check_reply(stamps, stamps, n)
        return submitted, stamps

    def _one(self, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
        t = time.perf_counter()
        tokens = self.engine.generate([prompt], max_new_tokens=n, eos_token_id=-1)[0]
        s = self.engine.stats  # this thread's generation: the caller holds the lock
        return tokens, token_times(t, s.ttft_s, s.step_s)

    def _scheduler(self, max_batch: int, clients: int, prompt_width: int = 0, mixed: bool = True):
        """The scheduler modes scheduler, chunkedW, mixedW and http measure: a queue that never refuses the clients."""
        from gpt2onnx.runtime import Scheduler, SchedulerConfig

        return Scheduler(self.engine, SchedulerConfig(max_batch=max_batch, max_queue=max(1024, clients), prompt_width=prompt_width,
                                                      mixed_step=mixed))

    def _scheduled(self, clients: int, requests, max_batch: int, prompt_width: int = 0, mixed: bool = True) -> list[dict]:
        sched = self._scheduler(max_batch, clients, prompt_width, mixed)

        def serve(prompt, n):
            res = sched.submit(prompt, max_new_tokens=n, eos_token_id=-1).result()
            check_reply(res.tokens, res.stats.token_s, n)
            if res.finish_reason != "length":
                raise RuntimeError(f"a {n}-token request finished with {res.finish_reason!r}")
            return res.stats.submitted_s, res.stats.token_s

        try:
            return run_clients(serve, requests, clients)
        finally:
            sched.close()

    def _static(self, clients: int, requests, max_batch: int) -> list[dict]:
        """Static batching: when the engine is free, everything waiting (up to max_batch) runs as one
        `generate` to the longest reply in it. A row is done at its own length; its later tokens are
        wasted work, the true cost of static batching."""
        waiting: queue.Queue = queue.Queue()

        def batcher() -> None:
            while (first := waiting.get()) is not None:
                batch = [first]
                until = time.perf_counter() + STATIC_WINDOW_S
                while len(batch) < max_batch and (left := until - time.perf_counter()) > 0:
                    try:
                        item = waiting.get(timeout=left)
                    except queue.Empty:
                        break
                    if item is None:
                        waiting.put(None)
                        break
                    batch.append(item)
                try:
                    t = time.perf_counter()
                    out = self.engine.generate([b["prompt"] for b in batch], max_new_tokens=max(b["n"] for b in batch), eos_token_id=-1)
                    times = token_times(t, self.engine.stats.ttft_s, self.engine.stats.step_s)
                    for b, tokens in zip(batch, out):
                        b["tokens"], b["token_s"] = tokens[:b["n"]], times[:b["n"]]
                except Exception as e:  # handed to the waiting clients, raised in their threads
                    for b in batch:
                        b["error"] = e
                for b in batch:
                    b["done"].set()

        def serve(prompt, n):
            item = {"prompt": prompt, "n": n, "submitted": time.perf_counter(), "done": threading.Event()}
            waiting.put(item)
            item["done"].wait()
            if "error" in item:
                raise item["error"]
            check_reply(item["tokens"], item["token_s"], n)
            return item["submitted"], item["token_s"]

        thread = threading.Thread(target=batcher, daemon=True)
        thread.start()
        try:
            return run_clients(serve, requests, clients)
        finally:
            waiting.put(None)
            thread.join()

