"""The systems under measurement, each served by its own worker process.

A worker loads one system (ours: an artifact through the runtime; `pytorch`: transformers eager;
`optimum`: ORTModelForCausalLM) and answers timing requests over a pipe. One process per system
gives each its own peak-memory figure (the runtime's worker never imports torch) and lets the
harness interleave systems request by request (A B A B) so drift hits all of them alike.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SystemSpec:
    name: str  # row label in the report: "ours fp32 cpu", "pytorch fp32", "optimum fp32"
    kind: str  # ours | pytorch | optimum
    path: str  # artifact dir (ours), HF checkpoint dir (pytorch), optimum export dir (optimum)
    provider: str = "cpu"  # cpu | cuda
    threads: int = 0  # 0 = one per core
    precision: str = "fp32"


class Worker:
    """Parent-side handle: `request(kind, **args) -> dict`, `close()`."""

    def __init__(self, spec: SystemSpec):
        ctx = mp.get_context("spawn")  # a clean interpreter: no torch inherited by the runtime's worker
        self.spec = spec
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(spec, child), daemon=True)
        self.proc.start()
        self.loaded = self._recv()

    def _recv(self) -> dict:
        msg = self.conn.recv()
        if "error" in msg:
            raise RuntimeError(f"{self.spec.name}: {msg['error']}")
        return msg

    def request(self, kind: str, **args) -> dict:
        self.conn.send({"kind": kind, **args})
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
    rng = np.random.default_rng(turns * 1000 + user_len)
    runner.new_conversation()
    history: list[int] = []
    out = []
    for _ in range(turns):
        history += rng.integers(0, runner.vocab - 1, size=user_len).tolist() + [runner.eos]
        timing, reply = runner.reply(history, reply_len)
        out.append({"prompt_len": len(history), **timing})
        history += reply + [runner.eos]
    return {"turns": out}


def _serve(spec: SystemSpec, conn) -> None:
    try:
        threads = spec.threads or os.cpu_count() or 1
        t = time.perf_counter()
        runner = {"ours": _Ours, "pytorch": _PyTorch, "optimum": _Optimum}[spec.kind](spec, threads)
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
            elif kind == "memory":
                conn.send({"peak_rss_mb": _peak_rss_mb(), **runner.gpu_memory()})
            else:
                conn.send({"error": f"unknown request {kind}"})
        except Exception as e:
            conn.send({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


class _Ours:
    def __init__(self, spec: SystemSpec, threads: int):
        from gpt2onnx.runtime import Engine

        self.engine = Engine.load(spec.path, provider=spec.provider, threads=threads, verify="size")
        self.vocab, self.eos = self.engine.vocab_size, self.engine.eos_token_id
        self.cache = None

    def info(self) -> dict:
        m = self.engine.manifest.raw
        return {"provider": self.engine.provider, "weights": m.get("weights", {}), "manifest": m}

    def generate(self, rows, new_tokens: int) -> dict:
        t = time.perf_counter()
        self.engine.generate(rows, max_new_tokens=new_tokens, eos_token_id=-1)
        total = time.perf_counter() - t
        s = self.engine.stats
        return {"ttft_s": s.ttft_s, "step_s": s.step_s, "total_s": total}

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


class _HFGenerate:
    """Shared timing for transformers-style `generate`: a stopping criterion stamps every token."""

    model = None
    device = "cpu"

    def generate(self, rows, new_tokens: int) -> dict:
        return self._generate(rows, new_tokens)[0]

    def new_conversation(self) -> None:
        pass  # DialoGPT's usage: every turn calls generate on the whole history, nothing kept

    def reply(self, history: list[int], new_tokens: int) -> tuple[dict, list[int]]:
        timing, out = self._generate([history], new_tokens)
        return {**timing, "cached_tokens": 0}, out[0, len(history):].tolist()

    def _generate(self, rows, new_tokens: int):
        """Greedy `generate` of exactly `new_tokens` per row: (timings, output ids [B, S + new])."""
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
        t = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, pad_token_id=self.eos, stopping_criteria=StoppingCriteriaList([Stamp()]))
        total = time.perf_counter() - t
        return {"ttft_s": stamps[0] - t, "step_s": list(np.diff(stamps)), "total_s": total}, out.cpu()

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
