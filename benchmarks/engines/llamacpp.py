"""llama.cpp, the edge anchor: the Hugging Face checkpoint converted to GGUF, and the runner that times
it through llama-cpp-python.

| our precision | GGUF |
|---|---|
| fp32 | F32  |
| int8 | Q8_0 |
| int4 | Q4_0 |

`make llamacpp` builds llama-cpp-python from its source distribution and leaves the llama.cpp sources
it vendors in build/llamacpp/llama.cpp. Their convert_hf_to_gguf.py writes F32; llama.cpp's quantizer
(`llama_model_quantize`, what the llama-quantize tool runs) writes Q8_0 and Q4_0 from it with its
defaults. Both run in a child process (`python -m gpt2onnx.benchmarks.engines.llamacpp`), so the
converter's modules never enter the harness. Two things the converter needs that our checkpoints may
lack are supplied in that process, without touching the vendored files:
- `n_ctx` in config.json (real GPT-2 / DialoGPT configs carry it; older saved checkpoints do not):
  taken from `n_positions`;
- a known pre-tokenizer: a tokenizer.json whose pre-tokenizer is GPT-2's byte-level split (our
  synthetic tokenizer) is declared "gpt-2" when the converter does not recognise its hash.
Beside each model-TYPE.gguf a model-TYPE.json records the bytes of weights read per token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gpt2onnx.runtime.errors import Gpt2OnnxError

from ..clients import SerialClients
from ..worker import SystemSpec
from .pytorch import checkpoint_name, local_checkpoint

GGUF_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
# where `make llamacpp` unpacks the llama.cpp sources (the repository's build/ folder)
LLAMACPP_SRC = str(Path(__file__).resolve().parents[2] / "build" / "llamacpp" / "llama.cpp")
LLAMACPP_HINT = "run `make llamacpp` (builds llama-cpp-python from its source distribution once, minutes on 2 cores)"
# where `make llamacpp` builds llama.cpp's own C++ tools (llama-bench, llama-server) from the same sources
LLAMACPP_TOOLS = str(Path(__file__).resolve().parents[2] / "build" / "llamacpp" / "tools" / "bin")
TOOLS = ("llama-bench", "llama-batched-bench", "llama-server")


def missing(llamacpp_src: str = LLAMACPP_SRC) -> str | None:
    """Why the llamacpp baseline cannot run here, or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed: {LLAMACPP_HINT}"
    if not os.path.isfile(os.path.join(llamacpp_src, "convert_hf_to_gguf.py")):
        return f"no llama.cpp sources (convert_hf_to_gguf.py) in {llamacpp_src}: {LLAMACPP_HINT}, or pass --llamacpp-src"
    for mod in ("transformers", "torch"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (the GGUF converter needs it; pip install 'gpt2onnx[bench]')"
    return None


def tools_missing(tools_dir: str = LLAMACPP_TOOLS) -> str | None:
    """Why llama.cpp's C++ tools cannot run here, or None."""
    for tool in TOOLS:
        if not os.access(os.path.join(tools_dir, tool), os.X_OK):
            return f"no {tool} in {tools_dir}: run `make llamacpp` (also builds llama.cpp's C++ tools from the same sources)"
    if not os.access(TIME, os.X_OK):
        return f"no {TIME} (GNU time) to read llama-bench's peak RSS"
    return None


def unfit(precision: str, provider: str) -> str | None:
    """Why llama.cpp has no row for this precision and provider, or None."""
    if provider != "cpu":
        return "make llamacpp builds llama.cpp for CPU only"
    return None if precision in GGUF_TYPES else f"no GGUF counterpart of {precision}"


def gguf_model(hf: str, cache: str, precision: str, llamacpp_src: str = LLAMACPP_SRC, log=print) -> str:
    """The GGUF file of checkpoint `hf` at `precision` (a key of GGUF_TYPES), converted into `cache`
    once: F32 by the vendored converter, the others quantized from the F32 file.

    Raises:
        Gpt2OnnxError: the converter or the quantizer failed (their output's last lines say why).
    """
    gtype = GGUF_TYPES[precision]
    folder = os.path.join(cache, f"llamacpp-{checkpoint_name(hf)}")
    out = os.path.join(folder, f"model-{gtype}.gguf")
    if os.path.isfile(out) and os.path.isfile(_sidecar(out)):
        return out
    os.makedirs(folder, exist_ok=True)
    if gtype == "F32":
        log(f"converting {hf} to GGUF F32 in {out} (llama.cpp's convert_hf_to_gguf.py)")
        cmd = ["convert", llamacpp_src, local_checkpoint(hf), out]
    else:
        f32 = gguf_model(hf, cache, "fp32", llamacpp_src, log)
        log(f"quantizing {f32} to {gtype} (llama.cpp's quantizer)")
        cmd = ["quantize", llamacpp_src, f32, out, gtype]
    r = subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.engines.llamacpp", *cmd], capture_output=True, text=True)
    if r.returncode != 0 or not os.path.isfile(out):
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        raise Gpt2OnnxError(f"llama.cpp {gtype} conversion of {hf} failed: {tail}")
    return out


def gguf_info(path: str) -> dict:
    """What the conversion recorded beside a GGUF file: {type, bytes_per_token, tensor_types}."""
    with open(_sidecar(path)) as f:
        return json.load(f)


def _sidecar(gguf: str) -> str:
    return gguf[: -len(".gguf")] + ".json"


class LlamaCpp(SerialClients):
    """llama.cpp through llama-cpp-python: greedy, exactly `new_tokens` per reply (its `generate`
    never stops on EOS by itself). Batch 1 only: the binding decodes one sequence, so the harness
    leaves this system's batch > 1 cells empty. Between chat turns the binding keeps the KV cache
    and runs only the tokens after the longest common prefix, as llama.cpp users get it."""

    max_batch = 1

    def __init__(self, spec: SystemSpec, threads: int):
        from llama_cpp import Llama

        if spec.provider != "cpu":
            raise RuntimeError("the llamacpp baseline is built for CPU only")
        # n_ctx 0: the model's own context (n_positions). use_mmap off: the weights read into memory of
        # their own, which decodes faster than the page cache's mapping of the GGUF (2-core Xeon, batch 1,
        # ms/token mmap vs not: F32 35.4 vs 20.9, Q8_0 13.9 vs 11.0, Q4_0 7.8 vs 7.8, same or lower peak RSS:
        # the anchor at its best). flash_attn on: what llama.cpp's own tools' default ("auto") resolves to
        # on a CPU (the binding's bool says on or off; its default is off), and the faster for what the
        # binding is left to measure where llama-bench runs the decode points (llama_bench, -fa 0,1): prompts
        # and chat turns (Q8_0, 2-core Xeon, on / off, medians of 4 fresh processes: TTFT 1.04x at prompt
        # 32, 0.87x at 500, 0.79x at 1000; per token after them 1.03x, 1.07x, 1.16x). The rest are the
        # binding's defaults (f16 KV cache, n_batch 512).
        self.llm = Llama(spec.path, n_ctx=0, n_threads=threads, n_threads_batch=threads, use_mmap=False, flash_attn=True,
                         verbose=False)
        self.vocab, self.eos = self.llm.n_vocab(), self.llm.token_eos()
        self.weights = {"bytes_per_token": gguf_info(spec.path)["bytes_per_token"]}
        self.path, self.threads = spec.path, threads

    def info(self) -> dict:
        return {"provider": "cpu", "weights": self.weights, "max_batch": self.max_batch, "kv_cache": "float16"}  # its default, f16

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

    def concurrent(self, mode: str, clients: int, requests, max_batch: int) -> list[dict]:
        """Mode `server`: llama.cpp's own continuous batching (server_concurrent), a slot per client."""
        if mode == "server":
            return server_concurrent(self.path, self.threads, clients, requests, self.llm.n_ctx())
        return super().concurrent(mode, clients, requests, max_batch)

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


# ---- llama.cpp's own C++ tools: llama-bench and llama-server ------------------------------------

TIME = "/usr/bin/time"  # GNU time -v: the peak RSS of the one process it starts (ru_maxrss of a fresh child)


def llama_bench(gguf: str, threads: int, prompts: list[int], decode: list[tuple[int, int]], repetitions: int = 5,
                tools_dir: str = LLAMACPP_TOOLS, timeout_s: float = 600) -> dict:
    """llama.cpp measured by itself: `llama-bench` in fresh processes, each test `repetitions` times after
    llama-bench's own warm-up, at every batch-1 point the harness times through the binding: the prompt
    of each length in `prompts` (pp: one batch, empty cache: the time to first token's work) and each
    decode point (depth, new tokens) in `decode` (tg: `new tokens` one at a time after a `depth`-token
    context, -d: the decode and context scenarios), each with flash attention off and on (`-fa 0,1`):
    its default, auto, turns it on on a CPU, where it speeds up prompts but slowed decode after 1000
    tokens (Q8_0, 2-core Xeon: 56-61 against 48-50 tokens/s), so a user after speed picks per use and
    the report shows the faster. Weights read into memory (`-lm none`, as the binding's
    use_mmap=False), llama.cpp's defaults otherwise (f16 KV cache).

    The first prompt and the first decode point run in processes of their own, whose peak RSS (GNU
    time's maximum resident set size, the larger of the two) is the footprint: a process that loads and
    runs one request, as the harness's memory table measures every system. The other points run
    together, a process for the prompts and one per count of new tokens.

    Returns {pp: [{prompt_len, flash_attn, ms (the whole prompt), tokens_per_s}], tg: [{depth,
    new_tokens, flash_attn, ms_per_token, tokens_per_s}], peak_rss_mb, repetitions, commands}.

    Raises:
        Gpt2OnnxError: the tool is missing, failed or printed no result (its last lines say why).
    """
    why = tools_missing(tools_dir)
    if why:
        raise Gpt2OnnxError(why)
    common = ["-m", gguf, "-t", str(threads), "-r", str(repetitions), "-lm", "none", "-fa", "0,1", "-o", "json"]
    join = lambda xs: ",".join(str(x) for x in xs)  # noqa: E731
    (d0, n0), more = decode[0], decode[1:]
    runs = [["-p", str(prompts[0]), "-n", "0"], ["-p", "0", "-n", str(n0), "-d", str(d0)]]
    if prompts[1:]:
        runs.append(["-p", join(prompts[1:]), "-n", "0"])
    runs += [["-p", "0", "-n", str(n), "-d", join(d for d, m in more if m == n)] for n in dict.fromkeys(m for _, m in more)]
    out = {"pp": [], "tg": [], "peak_rss_mb": 0.0, "repetitions": repetitions, "commands": []}
    for i, args in enumerate(runs):
        tests, rss, cmd = _llama_bench(tools_dir, [*common, *args], timeout_s)
        out["commands"].append(cmd)
        if i < 2:
            out["peak_rss_mb"] = max(out["peak_rss_mb"], rss)
        for t in tests:
            if t["n_gen"]:
                out["tg"].append({"depth": t["n_depth"], "new_tokens": t["n_gen"], "flash_attn": bool(t["flash_attn"]),
                                  "ms_per_token": t["avg_ns"] / 1e6 / t["n_gen"], "tokens_per_s": t["avg_ts"]})
            else:
                out["pp"].append({"prompt_len": t["n_prompt"], "flash_attn": bool(t["flash_attn"]), "ms": t["avg_ns"] / 1e6,
                                  "tokens_per_s": t["avg_ts"]})
    return out


def _llama_bench(tools_dir: str, args: list[str], timeout_s: float) -> tuple[list[dict], float, str]:
    """(the tests' JSON records, peak RSS MB, the command) of one llama-bench process."""
    cmd = [os.path.join(tools_dir, "llama-bench"), *args]
    r = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True, timeout=timeout_s)
    try:
        tests = json.loads(r.stdout)
    except ValueError:
        tests = None
    if r.returncode != 0 or not tests:
        tail = " | ".join(r.stderr.strip().splitlines()[-3:])
        raise Gpt2OnnxError(f"llama-bench failed (exit {r.returncode}): {tail}")
    rss_kb = next(int(ln.rsplit(":", 1)[1]) for ln in r.stderr.splitlines() if "Maximum resident set size" in ln)
    return tests, rss_kb / 1024, "llama-bench " + " ".join(args)


def batched_bench(gguf: str, threads: int, prompt_len: int, new_tokens: int, batches: list[int],
                  tools_dir: str = LLAMACPP_TOOLS, timeout_s: float = 600) -> list[dict]:
    """llama.cpp's batched decode measured by itself: `llama-batched-bench` (B sequences, each its own
    `prompt_len`-token prompt run together, then `new_tokens` steps of B tokens; random tokens, no
    sampling), once per B in `batches`, with flash attention off and on (a process each). Weights read
    into memory (-lm none), n_batch 2048 / n_ubatch 512 as its README runs it, a KV cache of exactly
    the largest B's sequences.

    Returns [{batch, flash_attn, tokens_per_s (B x new tokens / the whole time, prompt included),
    decode_tokens_per_s (its S_TG), ttft_ms (its T_PP: the B prompts' pass)}].

    Raises:
        Gpt2OnnxError: the tool is missing, failed or printed no result (its last lines say why).
    """
    why = tools_missing(tools_dir)
    if why:
        raise Gpt2OnnxError(why)
    out = []
    for fa in ("off", "on"):
        cmd = [os.path.join(tools_dir, "llama-batched-bench"), "-m", gguf, "-t", str(threads), "-tb", str(threads),
               "-c", str(max(batches) * (prompt_len + new_tokens)), "-b", "2048", "-ub", "512", "-lm", "none", "-fa", fa,
               "-npp", str(prompt_len), "-ntg", str(new_tokens), "-npl", ",".join(map(str, batches)), "--output-format", "jsonl"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or len(rows) != len(batches):
            tail = " | ".join(r.stderr.strip().splitlines()[-3:])
            raise Gpt2OnnxError(f"llama-batched-bench failed (exit {r.returncode}): {tail}")
        out += [{"batch": x["pl"], "prompt_len": x["pp"], "new_tokens": x["tg"], "flash_attn": fa == "on",
                 "tokens_per_s": x["pl"] * x["tg"] / x["t"],
                 "decode_tokens_per_s": x["speed_tg"], "ttft_ms": x["t_pp"] * 1e3} for x in rows]
    return out


def median_of(runs: list[dict]) -> dict:
    """One system's llama_bench runs, one per repeat of the harness (interleaved with the other systems'
    runs, as every system's figures are), as one: at each point and flash-attention setting the medians
    of the timings, with each run's figure in `runs` (ms per token for tg, ms for pp, decode tokens/s for
    llama-batched-bench's batches); the largest peak RSS."""
    def points(kind: str, key: tuple[str, ...], figs: tuple[str, ...]) -> list[dict]:
        """Each point of `kind` (matched on `key`) with the medians of `figs`, the first's runs kept."""
        out = []
        for p in runs[0].get(kind, []):
            same = [q for r in runs for q in r.get(kind, []) if all(q[k] == p[k] for k in key)]
            out.append({**p, **{f: float(np.median([q[f] for q in same])) for f in figs}, "runs": [q[figs[0]] for q in same]})
        return out

    return {**runs[0], "pp": points("pp", ("prompt_len", "flash_attn"), ("ms", "tokens_per_s")),
            "tg": points("tg", ("depth", "new_tokens", "flash_attn"), ("ms_per_token", "tokens_per_s")),
            "batched": points("batched", ("batch", "flash_attn"), ("decode_tokens_per_s", "tokens_per_s", "ttft_ms")),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "repetitions": sum(r["repetitions"] for r in runs)}


def prefer_faster(systems: list[dict], summary: list[dict], bench: dict[str, dict], bandwidth_gbs: float) -> None:
    """Let each llama.cpp system's batch-1 rows (decode and context) show the faster of its two paths at
    every point both measured, in place: the per-token figures llama-bench's tg average where it beats
    the binding's p50 (it gives no percentiles: p50 = p90 = p99 = mean; `source: llama-bench`), the
    time to first token its pp time where that beats the binding's (`ttft_source: llama-bench`), the
    total recomputed from the two. Each system records every comparison in `llamacpp_path` {used (the
    first decode point's path), points: [{scenario, prompt_len, new_tokens, binding_ms, llama_bench_ms,
    llama_bench_fa, binding_ttft_ms, llama_bench_ttft_ms, llama_bench_ttft_fa}], binding_footprint_mb,
    llama_bench: the figures}, llama-bench's figure at each point the faster of its two flash-attention
    settings. The system's footprint is the lower of the two paths' peak RSS (llama-bench's: its C++ tools load
    no interpreter, as an edge deployment of llama.cpp runs), whichever was faster per token.
    Where llama-batched-bench ran, its batches become the system's throughput rows (_batched_rows)."""
    for x in systems:
        b = bench.get(x["name"])
        if not b:
            continue
        rows = [r for r in summary if r["system"] == x["name"] and r["scenario"] in ("decode", "context") and r["batch"] == 1]
        points = []
        for row in rows:
            tg = min((t for t in b["tg"] if (t["depth"], t["new_tokens"]) == (row["prompt_len"], row["new_tokens"])),
                     key=lambda t: t["ms_per_token"], default=None)  # the faster flash-attention setting
            pp = min((p for p in b["pp"] if p["prompt_len"] == row["prompt_len"]), key=lambda p: p["ms"],
                     default=None) if row["scenario"] == "decode" else None
            if not tg and not pp:
                continue
            points.append({"scenario": row["scenario"], "prompt_len": row["prompt_len"], "new_tokens": row["new_tokens"],
                           "binding_ms": row["p50_ms"], "llama_bench_ms": tg and tg["ms_per_token"],
                           "llama_bench_fa": tg and tg["flash_attn"], "binding_ttft_ms": row.get("ttft_ms"),
                           "llama_bench_ttft_ms": pp and pp["ms"], "llama_bench_ttft_fa": pp and pp["flash_attn"]})
            if tg and tg["ms_per_token"] < row["p50_ms"]:
                ms = tg["ms_per_token"]
                row.update({"p50_ms": ms, "p90_ms": ms, "p99_ms": ms, "mean_ms": ms, "decode_tokens_per_s": tg["tokens_per_s"],
                            "source": "llama-bench"})
                wb = x.get("weights_bytes_per_token")
                if wb:
                    row["achieved_gbs"] = wb / (ms / 1e3) / 1e9
                    row["bandwidth_fraction"] = row["achieved_gbs"] / bandwidth_gbs
            if pp and pp["ms"] < row.get("ttft_ms", float("inf")):
                row.update({"ttft_ms": pp["ms"], "ttft_source": "llama-bench"})
            if "source" in row or "ttft_source" in row:
                row["total_s"] = (row["ttft_ms"] + (row["new_tokens"] - 1) * row["p50_ms"]) / 1e3
                row["tokens_per_s"] = row["new_tokens"] / row["total_s"]
        summary.extend(_batched_rows(x["name"], b.get("batched", [])))
        if not points:
            continue
        t0 = b["tg"][0]  # the first decode point's
        first = next((p for p in points if (p["scenario"], p["prompt_len"], p["new_tokens"]) == ("decode", t0["depth"], t0["new_tokens"])), None)
        faster = bool(first) and first["llama_bench_ms"] < first["binding_ms"]
        x["llamacpp_path"] = {"used": "llama-bench" if faster else "llama-cpp-python", "points": points,
                              "binding_footprint_mb": x.get("footprint_mb"), "llama_bench": b}
        if b.get("peak_rss_mb") and not b["peak_rss_mb"] >= (x.get("footprint_mb") or float("inf")):
            x["footprint_mb"] = b["peak_rss_mb"]


def _batched_rows(system: str, batched: list[dict]) -> list[dict]:
    """The throughput rows the binding cannot give (it decodes one sequence): llama-batched-bench's
    medians at each batch, the faster flash-attention setting's, marked `source: llama-batched-bench`."""
    rows = []
    for batch in dict.fromkeys(p["batch"] for p in batched):
        p = max((q for q in batched if q["batch"] == batch), key=lambda q: q["decode_tokens_per_s"])
        step = 1e3 * batch / p["decode_tokens_per_s"]  # one step of `batch` tokens
        rows.append({"system": system, "scenario": "throughput", "batch": batch, "prompt_len": p["prompt_len"],
                     "new_tokens": p["new_tokens"], "tokens_per_s": p["tokens_per_s"], "decode_tokens_per_s": p["decode_tokens_per_s"],
                     "ttft_ms": p["ttft_ms"], "p50_ms": step, "p90_ms": step, "p99_ms": step, "mean_ms": step,
                     "total_s": batch * p["new_tokens"] / p["tokens_per_s"], "flash_attn": p["flash_attn"],
                     "source": "llama-batched-bench"})
    return rows


def server_concurrent(gguf: str, threads: int, clients: int, requests: list[tuple[list[int], int]], n_ctx: int,
                      tools_dir: str = LLAMACPP_TOOLS, timeout_s: float = 1800) -> list[dict]:
    """The concurrent scenario through `llama-server`: continuous batching with one slot per client
    (`-np clients`, each slot the model's whole context `n_ctx`), on a loopback port, weights read into
    memory. Closed-loop clients (clients.run_clients) stream /completion with the prompt as token ids,
    greedy, EOS ignored, no prompt cache reuse, and stamp each token's SSE chunk as it arrives.

    Bounded: the server is stopped when the requests are done, when one fails, or after `timeout_s`.
    Returns one record per request {prompt_len, new_tokens, submitted_s, token_s, released_late (tokens
    the server sent together with a later one: their stamps repeat that chunk's)}.

    Raises:
        Gpt2OnnxError: the server did not start (its last lines say why); RuntimeError: a reply not
            exactly its length.
    """
    import socket

    import httpx

    from ..clients import check_reply, run_clients

    why = tools_missing(tools_dir)
    if why:
        raise Gpt2OnnxError(why)
    with socket.socket() as sock:  # a free loopback port (the server binds it a moment later)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [os.path.join(tools_dir, "llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
           "-t", str(threads), "-tb", str(threads), "-np", str(clients), "-c", str(n_ctx * clients),
           "--cont-batching", "-lm", "none", "--no-webui", "--log-disable"]
    log = tempfile.TemporaryFile("w+")  # the server's messages, read back only when it fails to start
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    # no kept-alive connections: llama-server's HTTP library closes a connection after a few requests (5), and a
    # request sent on one it had closed ended with "Server disconnected without sending a response"
    http = httpx.Client(timeout=httpx.Timeout(timeout_s), limits=httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0))
    try:
        while True:  # /health answers 200 once the model is loaded
            if proc.poll() is not None:
                log.seek(0)
                raise Gpt2OnnxError(f"llama-server exited ({proc.returncode}): {' | '.join(log.read().strip().splitlines()[-3:])}")
            try:
                # a connection of its own: the pooled ones are for the requests (a reused /health connection the
                # server had closed ended the first request with "disconnected without sending a response")
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise Gpt2OnnxError(f"llama-server did not answer /health within {timeout_s:.0f} s")
            time.sleep(0.05)

        late = [0] * len(requests)  # per request: tokens the server released together with a later one

        def serve(prompt, n):
            submitted, stamps = time.perf_counter(), []
            body = {"prompt": prompt, "n_predict": n, "ignore_eos": True, "temperature": 0, "top_k": 1, "samplers": ["top_k"],
                    "cache_prompt": False, "stream": True}
            with http.stream("POST", f"{url}/completion", json=body) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"llama-server HTTP {r.status_code}: {r.read()[:200]!r}")
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    # tokens_predicted counts every token so far: a token whose text ends mid-way through a
                    # UTF-8 character is held back by the server and sent with the next chunk, so one chunk
                    # can release several tokens at once (they get its arrival time, as a client sees them)
                    got = json.loads(line[6:])["tokens_predicted"] - len(stamps)
                    stamps += [time.perf_counter()] * got
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the concurrent scenario ran past {timeout_s:.0f} s")
            check_reply(stamps, stamps, n)
            late[index[id(prompt)]] = len(stamps) - len(set(stamps))
            return submitted, stamps

        index = {id(p): i for i, (p, _) in enumerate(requests)}
        recs = run_clients(serve, requests, clients)
        for rec, k in zip(recs, late):
            rec["released_late"] = k
        return recs
    finally:
        http.close()
        log.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- the child process: the vendored converter, patched in memory, and the quantizer ------------

def _gpt2_byte_level(hf: str) -> bool:
    """The checkpoint's tokenizer.json pre-tokenizes as GPT-2 does: ByteLevel with GPT-2's regex."""
    try:
        with open(os.path.join(hf, "tokenizer.json"), encoding="utf-8") as f:
            pre = json.load(f).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return False
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def _convert(src: str, hf: str, out: str) -> None:
    sys.path.insert(0, src)  # the converter imports its `conversion` package and its gguf-py from there
    import convert_hf_to_gguf as cli  # vendored, found through the path above
    from conversion import base

    load_hparams = base.ModelBase.load_hparams

    def with_n_ctx(dir_model, is_mistral_format):
        h = load_hparams(dir_model, is_mistral_format)
        if h.get("model_type") == "gpt2" and "n_ctx" not in h:
            h["n_ctx"] = h["n_positions"]
        return h

    base.ModelBase.load_hparams = staticmethod(with_n_ctx)
    vocab_pre = base.TextModel.get_vocab_base_pre

    def gpt2_when_unknown(self, tokenizer):
        quiet = base.logger.level
        base.logger.setLevel(logging.ERROR)  # the unknown-hash banner, when we answer it below
        try:
            return vocab_pre(self, tokenizer)
        except NotImplementedError:
            if _gpt2_byte_level(hf):
                return "gpt-2"
            raise
        finally:
            base.logger.setLevel(quiet)

    base.TextModel.get_vocab_base_pre = gpt2_when_unknown
    tmp = out + ".tmp"
    sys.argv = ["convert_hf_to_gguf.py", hf, "--outfile", tmp, "--outtype", "f32"]
    cli.main()
    _finish(tmp, out, "F32")


def _quantize(src: str, f32: str, out: str, gtype: str) -> None:
    import ctypes

    import llama_cpp

    sys.path.insert(0, os.path.join(src, "gguf-py"))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[gtype]
    params.nthread = os.cpu_count() or 1
    tmp = out + ".tmp"
    if llama_cpp.llama_model_quantize(f32.encode(), tmp.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize {f32} -> {gtype} failed")
    _finish(tmp, out, gtype)


def _finish(tmp: str, out: str, gtype: str) -> None:
    """Record the weights read per token beside the file (every tensor but the position table, read
    one row per token; GPT-2's LM head is the token embedding, read whole), then move it in place."""
    from gguf import GGUFReader

    tensors = GGUFReader(tmp).tensors
    info = {"type": gtype,
            "bytes_per_token": int(sum(t.n_bytes for t in tensors if t.name != "position_embd.weight")),
            "tensor_types": sorted({t.tensor_type.name for t in tensors})}
    with open(_sidecar(out), "w") as f:
        json.dump(info, f)
    os.replace(tmp, out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m gpt2onnx.benchmarks.engines.llamacpp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="HF checkpoint -> GGUF F32 with the vendored converter")
    c.add_argument("src", help="the llama.cpp source directory")
    c.add_argument("hf")
    c.add_argument("out")
    q = sub.add_parser("quantize", help="GGUF F32 -> Q8_0 | Q4_0")
    q.add_argument("src", help="the llama.cpp source directory (its gguf-py reads the result)")
    q.add_argument("f32")
    q.add_argument("out")
    q.add_argument("type", choices=["Q8_0", "Q4_0"])
    a = p.parse_args()
    if a.cmd == "convert":
        _convert(a.src, a.hf, a.out)
    else:
        _quantize(a.src, a.f32, a.out, a.type)
