"""The systems under measurement, each served by its own worker process.

A worker loads one system (ours: an artifact through the runtime; `pytorch`: transformers eager;
`pytorch-compile`: transformers with a static KV cache and, on CUDA, the decode step compiled by
torch.compile mode "reduce-overhead"; `optimum`: ORTModelForCausalLM; `llamacpp`: a GGUF file through llama-cpp-python, batch 1 only;
`ctranslate2`: a CTranslate2 Generator) and answers timing requests over a pipe. One process per system
gives each its own peak-memory figure (the runtime's worker never imports torch) and lets the
harness interleave systems request by request (A B A B) so drift hits all of them alike.

The `generate` request returns {ttft_s, step_s (each decode step after the first token), total_s,
tokens (the new ids of each row: exactly the number asked, EOS never ends a row early)}.
The `concurrent` request runs closed-loop clients as threads inside the worker (run_clients) and
returns one timing record per request: {prompt_len, new_tokens, submitted_s, token_s}, all
time.perf_counter() stamps, whatever serves them (the scheduler, a lock around `generate`, or
static batches).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

# Static batching gathers what arrives this long after the first waiting request: closed-loop
# clients whose requests were in the last batch re-submit within microseconds of its end.
STATIC_WINDOW_S = 0.005


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


def prompt_rows(batch: int, length: int, vocab: int) -> list[list[int]]:
    """Deterministic prompts: the same rows for every system (ids spread over the vocabulary)."""
    rng = np.random.default_rng(length * 1000 + batch)
    return rng.integers(0, vocab - 1, size=(batch, length)).tolist()


def run_chat(runner, turns: int, user_len: int, reply_len: int) -> dict:
    """A DialoGPT conversation: each turn a user message (`user_len` deterministic ids + EOS), then
    a reply of exactly `reply_len` tokens + EOS, the whole history being the next turn's prompt.
    Every system gets the same user messages; each continues its own replies."""
    from gpt2onnx.runtime.chat import turn  # DialoGPT's turn format, the runtime's own

    rng = np.random.default_rng(turns * 1000 + user_len)
    runner.new_conversation()
    history: list[int] = []
    out = []
    for _ in range(turns):
        history += turn(rng.integers(0, runner.vocab - 1, size=user_len).tolist(), runner.eos)
        timing, reply = runner.reply(history, reply_len)
        out.append({"prompt_len": len(history), **timing})
        history += turn(reply, runner.eos)
    return {"turns": out}


def concurrent_requests(n: int, prompt_len: tuple[int, int], reply_len: tuple[int, int], vocab: int) -> list[tuple[list[int], int]]:
    """`n` deterministic (prompt ids, reply length) pairs, lengths uniform in the inclusive ranges:
    the same list for every system (ids spread over the vocabulary, as prompt_rows)."""
    rng = np.random.default_rng([n, *prompt_len, *reply_len])
    plens = rng.integers(prompt_len[0], prompt_len[1] + 1, size=n)
    rlens = rng.integers(reply_len[0], reply_len[1] + 1, size=n)
    return [(rng.integers(0, vocab - 1, size=p).tolist(), int(r)) for p, r in zip(plens, rlens)]


def run_clients(serve, requests: list[tuple[list[int], int]], clients: int) -> list[dict]:
    """Closed loop: `clients` threads each take the next request as soon as their last one is done.

    `serve(prompt, new_tokens)` blocks until the reply is complete and returns (submitted_s, token_s):
    when it was submitted and when each of its tokens came out. Returns one record per request, in
    request order; an exception in any client is raised here."""
    take = threading.Lock()
    pending = iter(enumerate(requests))
    out: list[dict] = [{} for _ in requests]

    def client() -> None:
        while True:
            with take:
                nxt = next(pending, None)
            if nxt is None:
                return
            i, (prompt, n) = nxt
            submitted, token_s = serve(prompt, n)
            out[i] = {"prompt_len": len(prompt), "new_tokens": n, "submitted_s": submitted, "token_s": [float(t) for t in token_s]}

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    return out


def token_times(start_s: float, ttft_s: float, step_s: list[float]) -> np.ndarray:
    """Per-token stamps of one `generate` from its start, its time to first token and its decode
    steps: the first token at start + ttft, each later one a step after the one before."""
    return start_s + ttft_s + np.concatenate([[0.0], np.cumsum(step_s)])


class _SerialClients:
    """What a service without a scheduler does: one request at a time through `_one`, behind a lock.

    `_one(prompt, new_tokens) -> (tokens, token_s)` must return exactly `new_tokens` tokens."""

    def concurrent(self, mode: str, clients: int, requests, max_batch: int) -> list[dict]:
        if mode != "serial":
            raise ValueError(f"{type(self).__name__[1:]} runs the concurrent scenario serially only, not {mode!r}")
        lock = threading.Lock()

        def serve(prompt, n):
            submitted = time.perf_counter()
            with lock:  # the queue wait is part of the time to first token
                tokens, token_s = self._one(prompt, n)
            _check_reply(tokens, token_s, n)
            return submitted, token_s

        return run_clients(serve, requests, clients)


def _check_reply(tokens, token_s, n: int) -> None:
    if len(tokens) != n or len(token_s) != n:  # eos_token_id=-1: a reply shorter or longer than asked is a bug, not a figure
        raise RuntimeError(f"a {n}-token request got {len(tokens)} tokens and {len(token_s)} token stamps")


def _serve(spec: SystemSpec, conn) -> None:
    try:
        threads = spec.threads or os.cpu_count() or 1
        t = time.perf_counter()
        runner = {"ours": _Ours, "pytorch": _PyTorch, "pytorch-compile": _PyTorchCompiled, "optimum": _Optimum,
                  "llamacpp": _LlamaCpp, "ctranslate2": _CTranslate2}[spec.kind](spec, threads)
        conn.send({"load_s": time.perf_counter() - t, "threads": threads, **runner.info()})
    except Exception as e:  # reported to the parent as one line
        conn.send({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
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
                conn.send({"peak_rss_mb": _peak_rss_mb(), **runner.gpu_memory()})
            else:
                conn.send({"error": f"unknown request {kind}"})
        except Exception as e:
            conn.send({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


class _Ours(_SerialClients):
    def __init__(self, spec: SystemSpec, threads: int):
        from gpt2onnx.runtime import Engine

        self.engine = Engine.load(spec.path, provider=spec.provider, threads=threads, verify="size")
        self.vocab, self.eos = self.engine.vocab_size, self.engine.eos_token_id
        self.cache = None

    def info(self) -> dict:
        m = self.engine.manifest.raw
        # cuda_graph: whether onnxruntime accepted enable_cuda_graph for this session (False on the cpu provider)
        return {"provider": self.engine.provider, "weights": m.get("weights", {}), "manifest": m,
                "cuda_graph": bool(self.engine.session_config.cuda_graph)}

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
        return _nvidia_smi_mb() if self.engine.device == "cuda" else {}

    # ---- concurrent clients: mode scheduler | http | serial | static ---------------------------

    def concurrent(self, mode: str, clients: int, requests, max_batch: int) -> list[dict]:
        if mode == "scheduler":
            return self._scheduled(clients, requests, max_batch)
        if mode == "static":
            return self._static(clients, requests, max_batch)
        if mode == "http":
            return self._http(clients, requests, max_batch)
        return super().concurrent(mode, clients, requests, max_batch)

    def _http(self, clients: int, requests, max_batch: int) -> list[dict]:
        """The scheduler behind `gpt2onnx serve`'s app, in this process on a loopback port; clients
        stream /v1/completions over HTTP and stamp each token's SSE chunk as it arrives, so the
        difference from mode `scheduler` is what HTTP, JSON and SSE cost."""
        import json
        import socket

        import httpx
        import uvicorn

        from gpt2onnx.serve.app import Model, build_app
        from gpt2onnx.serve.config import ServeConfig

        sched = self._scheduler(max_batch, clients)
        app = build_app([Model("m", self.engine, sched, 0)], ServeConfig(max_tokens=self.engine.n_positions - 1, request_timeout_s=3600))
        sock = socket.create_server(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        http = httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=clients + 4))

        def serve(prompt, n):
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
            _check_reply(stamps, stamps, n)
            return submitted, stamps

        try:
            return run_clients(serve, requests, clients)
        finally:
            http.close()
            server.should_exit = True  # the app's shutdown closes the scheduler
            thread.join(60)

    def _one(self, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
        t = time.perf_counter()
        tokens = self.engine.generate([prompt], max_new_tokens=n, eos_token_id=-1)[0]
        s = self.engine.stats  # this thread's generation: the caller holds the lock
        return tokens, token_times(t, s.ttft_s, s.step_s)

    def _scheduler(self, max_batch: int, clients: int):
        """The scheduler modes scheduler and http measure: a queue that never refuses the clients."""
        from gpt2onnx.runtime import Scheduler, SchedulerConfig

        return Scheduler(self.engine, SchedulerConfig(max_batch=max_batch, max_queue=max(1024, clients)))

    def _scheduled(self, clients: int, requests, max_batch: int) -> list[dict]:
        sched = self._scheduler(max_batch, clients)

        def serve(prompt, n):
            res = sched.submit(prompt, max_new_tokens=n, eos_token_id=-1).result()
            _check_reply(res.tokens, res.stats.token_s, n)
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
            _check_reply(item["tokens"], item["token_s"], n)
            return item["submitted"], item["token_s"]

        thread = threading.Thread(target=batcher, daemon=True)
        thread.start()
        try:
            return run_clients(serve, requests, clients)
        finally:
            waiting.put(None)
            thread.join()


class _HFGenerate(_SerialClients):
    """Shared timing for transformers-style `generate`: a stopping criterion stamps every token."""

    model = None
    device = "cpu"

    def _generate_args(self, batch: int) -> dict:
        """Extra `generate` arguments for a batch of this size (a static cache); called inside the grad mode."""
        return {}

    def _grad_mode(self):
        import torch

        return torch.inference_mode()

    def generate(self, rows, new_tokens: int) -> dict:
        timing, out = self._generate(rows, new_tokens)
        return {**timing, "tokens": out[:, len(rows[0]):].tolist()}

    def new_conversation(self) -> None:
        pass  # DialoGPT's usage: every turn calls generate on the whole history, nothing kept

    def reply(self, history: list[int], new_tokens: int) -> tuple[dict, list[int]]:
        timing, out = self._generate([history], new_tokens)
        return {**timing, "cached_tokens": 0}, out[0, len(history):].tolist()

    def _one(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        timing, out = self._generate([prompt], n)
        return out[0, len(prompt):].tolist(), timing["token_s"]

    def _generate(self, rows, new_tokens: int):
        """Greedy `generate` of exactly `new_tokens` per row: (timings, output ids [B, S + new]).
        timings: ttft_s, step_s, total_s, and token_s (each token's perf_counter stamp)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stamps: list[float] = []

        class Stamp(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                if self.device_sync:
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        Stamp.device_sync = self.device == "cuda"
        ids = torch.tensor(rows, device=self.device)
        with self._grad_mode():
            extra = self._generate_args(len(rows))  # made (and a static cache warmed up) before the clock starts
            t = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=self.eos, stopping_criteria=StoppingCriteriaList([Stamp()]),
                                      **extra)
        total = time.perf_counter() - t
        return {"ttft_s": stamps[0] - t, "step_s": list(np.diff(stamps)), "total_s": total, "token_s": stamps}, out.cpu()

    def gpu_memory(self) -> dict:
        if self.device != "cuda":
            return {}
        import torch

        return {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20, **_nvidia_smi_mb()}


class _PyTorch(_HFGenerate):
    def __init__(self, spec: SystemSpec, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.device = "cuda" if spec.provider == "cuda" else "cpu"
        dtype = torch.float16 if spec.precision == "fp16" else torch.float32
        self.model = transformers.AutoModelForCausalLM.from_pretrained(spec.path, torch_dtype=dtype).to(self.device).eval()
        self.eos = self.model.config.eos_token_id
        self.vocab = self.model.config.vocab_size
        self.precision = spec.precision

    def info(self) -> dict:
        params = {n: p for n, p in self.model.named_parameters()}
        # per token: every weight once, except the position table (one row); wte is read whole
        # because the tied LM head multiplies by it
        per_token = sum(p.numel() * p.element_size() for n, p in params.items() if not n.endswith("wpe.weight"))
        return {"provider": self.device, "weights": {"bytes_per_token": per_token}}


class _PyTorchCompiled(_PyTorch):
    """What a GPU user runs with transformers for low latency: `generate` with a static KV cache, whose
    decode step `generate` compiles itself (torch.compile, mode "reduce-overhead": CUDA graphs), the
    recipe of transformers' "Optimizing inference" guide. The prompt pass runs eagerly (generate
    compiles decode steps only), so prompts of any length reuse the one compiled step.

    One StaticCache per batch size, of the model's whole position table and kept across calls (reset
    before each): the compiled step then sees one shape per batch size whatever the prompt and reply
    lengths, so compilation and graph capture happen once, in the warm-up this class runs the first
    time it meets a batch size, never in a timed run (a cache sized to each call's length would
    recompile whenever a call needs more positions than the one before).

    On CPU the same static-cache path runs without compiling: `generate` compiles on CUDA only (its
    auto-compile criteria), and on the 2-core development machine inductor took 10-30 s per batch size
    even for the 2-layer test model (forced on there once, transformers 4.57 and 5.17: one graph, no
    recompiles or graph breaks, tokens equal to eager's), too slow for the test suite; the tokens still
    go through the static cache and the warm-up a GPU run uses."""

    # untimed generations each new batch size gets before its first timed one: the first call traces
    # and compiles, the next records the CUDA graphs (cudagraph trees warm up before they record)
    WARMUP_CALLS = 3
    WARMUP_TOKENS = 8

    def __init__(self, spec: SystemSpec, threads: int):
        from transformers import CompileConfig

        super().__init__(spec, threads)
        self.compiled = self.device == "cuda"
        self.caches: dict[int, object] = {}  # batch size -> its StaticCache
        # fullgraph: GPT-2 compiles whole (_can_compile_fullgraph); a graph break fails loudly (the harness
        # drops the baseline with the reason) instead of measuring a step that runs partly eager
        self.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")

    def info(self) -> dict:
        return {**super().info(), "compiled": self.compiled}

    def _grad_mode(self):
        import torch

        # no_grad, as generate itself runs: the kept cache's tensors must stay ordinary tensors, which
        # reset() may write outside inference mode, and inference tensors are not what the recipe compiles
        return torch.no_grad()

    def _generate_args(self, batch: int) -> dict:
        from transformers import StaticCache

        cache = self.caches.get(batch)
        if cache is None:
            cache = self.caches[batch] = StaticCache(config=self.model.config, max_cache_len=self.model.config.n_positions)
            self._warm_up(batch)
        cache.reset()  # zeros, in place: the compiled step keeps reading the same addresses
        # disable_compile off CUDA: see the class docstring
        return {"past_key_values": cache, "compile_config": self.compile_config, "disable_compile": not self.compiled}

    def _warm_up(self, batch: int) -> None:
        rows = prompt_rows(batch, 8, self.vocab)
        for _ in range(self.WARMUP_CALLS):
            self._generate(rows, self.WARMUP_TOKENS)  # the cache exists now: no recursion


class _Optimum(_HFGenerate):
    def __init__(self, spec: SystemSpec, threads: int):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        provider = "CUDAExecutionProvider" if spec.provider == "cuda" else "CPUExecutionProvider"
        self.device = "cuda" if spec.provider == "cuda" else "cpu"
        self.model = ORTModelForCausalLM.from_pretrained(spec.path, session_options=so, provider=provider)
        self.eos = self.model.config.eos_token_id
        self.vocab = self.model.config.vocab_size
        self.path = spec.path

    def info(self) -> dict:
        import onnx

        from gpt2onnx.export.graph import weight_bytes_per_token

        m = onnx.load(os.path.join(self.path, "model.onnx"), load_external_data=False)
        return {"provider": self.device, "weights": {"bytes_per_token": weight_bytes_per_token(m)}}


class _LlamaCpp(_SerialClients):
    """llama.cpp through llama-cpp-python: greedy, exactly `new_tokens` per reply (its `generate`
    never stops on EOS by itself). Batch 1 only: the binding decodes one sequence, so the harness
    leaves this system's batch > 1 cells empty. Between chat turns the binding keeps the KV cache
    and runs only the tokens after the longest common prefix, as llama.cpp users get it."""

    max_batch = 1

    def __init__(self, spec: SystemSpec, threads: int):
        from llama_cpp import Llama

        from .anchors import gguf_info

        if spec.provider != "cpu":
            raise RuntimeError("the llamacpp baseline is built for CPU only")
        # n_ctx 0: the model's own context (n_positions). use_mmap off: the weights read into memory of
        # their own, which decodes faster than the page cache's mapping of the GGUF (2-core Xeon, batch 1,
        # ms/token mmap vs not: F32 35.4 vs 20.9, Q8_0 13.9 vs 11.0, Q4_0 7.8 vs 7.8, same or lower peak RSS:
        # the anchor at its best). The rest are the binding's defaults (f16 KV cache, n_batch 512, flash
        # attention off where llama.cpp's own tools default to "auto").
        self.llm = Llama(spec.path, n_ctx=0, n_threads=threads, n_threads_batch=threads, use_mmap=False, verbose=False)
        self.vocab, self.eos = self.llm.n_vocab(), self.llm.token_eos()
        self.weights = {"bytes_per_token": gguf_info(spec.path)["bytes_per_token"]}

    def info(self) -> dict:
        return {"provider": "cpu", "weights": self.weights, "max_batch": self.max_batch}

    def generate(self, rows, new_tokens: int) -> dict:
        if len(rows) != 1:
            raise ValueError("the llamacpp baseline decodes batch 1 only")
        self.llm.reset()  # a fresh KV cache: no prefix of an earlier run is reused
        timing, out = self._run(rows[0], new_tokens)
        return {**timing, "tokens": [out]}

    def new_conversation(self) -> None:
        self.llm.reset()

    def reply(self, history: list[int], new_tokens: int) -> tuple[dict, list[int]]:
        held = self.llm.n_tokens
        same = next((i for i, (a, b) in enumerate(zip(self.llm.input_ids[:held], history)) if a != b), min(held, len(history)))
        timing, out = self._run(history, new_tokens)
        return {**timing, "cached_tokens": min(same, len(history) - 1)}, out  # the binding re-runs a fully cached prompt's last token

    def _one(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        self.llm.reset()
        timing, out = self._run(prompt, n)
        return out, timing["token_s"]

    def _run(self, prompt: list[int], n: int) -> tuple[dict, list[int]]:
        stamps, out = [], []
        t = time.perf_counter()
        gen = self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0)  # temp 0: llama.cpp's greedy sampler
        for tok in gen:
            stamps.append(time.perf_counter())
            out.append(int(tok))
            if len(out) == n:
                break
        gen.close()
        total = time.perf_counter() - t
        return {"ttft_s": stamps[0] - t, "step_s": list(np.diff(stamps)), "total_s": total, "token_s": stamps}, out

    def gpu_memory(self) -> dict:
        return {}


class _CTranslate2(_SerialClients):
    """A CTranslate2 Generator: greedy, exactly `new_tokens` per row (min_length = max_length, so EOS
    is held back as the PyTorch baseline's min_new_tokens does). The prompt runs at once
    (include_prompt_in_result=False); a callback stamps every token. No cache between chat turns."""

    def __init__(self, spec: SystemSpec, threads: int):
        import json

        import ctranslate2

        self.device = "cuda" if spec.provider == "cuda" else "cpu"
        compute = {"fp32": "float32", "fp16": "float16", "int8": "int8"}[spec.precision]
        self.model = ctranslate2.Generator(spec.path, device=self.device, compute_type=compute, intra_threads=threads,
                                           inter_threads=1)
        with open(os.path.join(spec.path, "vocabulary.json"), encoding="utf-8") as f:
            self.tokens = json.load(f)  # id -> the string Generator takes
        with open(os.path.join(spec.path, "config.json"), encoding="utf-8") as f:
            self.eos = self.tokens.index(json.load(f)["eos_token"])
        self.vocab = len(self.tokens)
        self.path = spec.path

    def info(self) -> dict:
        from .anchors import ctranslate2_bytes_per_token

        return {"provider": self.device, "weights": {"bytes_per_token": ctranslate2_bytes_per_token(self.path)}}

    def generate(self, rows, new_tokens: int) -> dict:
        timing, out = self._generate(rows, new_tokens)
        return {**timing, "tokens": out}

    def new_conversation(self) -> None:
        pass

    def reply(self, history: list[int], new_tokens: int) -> tuple[dict, list[int]]:
        timing, out = self._generate([history], new_tokens)
        return {**timing, "cached_tokens": 0}, out[0]

    def _one(self, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
        timing, out = self._generate([prompt], n)
        return out[0], timing["token_s"]

    def _generate(self, rows, new_tokens: int) -> tuple[dict, list[list[int]]]:
        """Greedy generation of exactly `new_tokens` per row: (timings as _HFGenerate's, new ids per row)."""
        stamps: list[float] = []

        def stamp(step) -> bool:
            if step.batch_id == 0:  # every row steps together: one stamp per step
                stamps.append(time.perf_counter())
            return False

        start = [[self.tokens[i] for i in row] for row in rows]
        t = time.perf_counter()
        res = self.model.generate_batch(start, max_length=new_tokens, min_length=new_tokens, sampling_topk=1, beam_size=1,
                                        include_prompt_in_result=False, callback=stamp)
        total = time.perf_counter() - t
        out = [r.sequences_ids[0] for r in res]
        return {"ttft_s": stamps[0] - t, "step_s": list(np.diff(stamps)), "total_s": total, "token_s": stamps}, out

    def gpu_memory(self) -> dict:
        return _nvidia_smi_mb() if self.device == "cuda" else {}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across
    exec, so a spawned worker would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def _nvidia_smi_mb() -> dict:
    """GPU memory this process holds, from nvidia-smi (None where unavailable)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    for line in out.splitlines():
        pid, mb = (x.strip() for x in line.split(","))
        if int(pid) == os.getpid():
            return {"gpu_used_mb": float(mb)}
    return {}
