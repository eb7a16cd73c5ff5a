"""`gpt2onnx bench`: latency, throughput, memory and accuracy of artifacts beside PyTorch and optimum.

Every system runs in its own worker process (systems.py). Measurements are interleaved: for each
repeat, each scenario point is run on every system in turn (A B C A B C ...), after one untimed
warm-up per point. Figures are medians over repeats. The concurrent scenario runs C closed-loop
clients inside each worker (systems.run_clients) through the continuous-batching scheduler, a lock
around `generate` (serial) and static batches. Output: results.json (schema below),
results.csv, report.md and PNG plots in --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from gpt2onnx.runtime.artifact import load_manifest
from gpt2onnx.runtime.errors import Gpt2OnnxError

from . import anchors
from .report import floor_bandwidth
from .systems import SystemSpec, Worker, WorkerDied, WorkerError

SCHEMA_VERSION = 2  # 2: concurrent records and summary rows (no batch or prompt_len), the concurrent key
PRECISIONS = ("fp32", "fp16", "int8", "int4")
# pytorch and optimum run the checkpoint in fp32 (pytorch fp16 on CUDA); pytorch-compile is pytorch with a
# static KV cache and, on CUDA, its decode step compiled (torch.compile "reduce-overhead", systems.py); the
# anchors (anchors.py) are converted once per precision of the artifacts measured. Absent ones are skipped
# with the reason.
BASELINES = ("pytorch", "pytorch-compile", "optimum", "llamacpp", "ctranslate2")
OURS_MODES = ("scheduler", "http", "serial", "static")  # the concurrent scenario's ways to serve an artifact
# Pause before each timed run: the previous system's worker threads (PyTorch's OpenMP, onnxruntime's
# pool) spin for a while after their work, and on a 2-core machine they would slow the next system.
SETTLE_S = 0.3
# results.json, schema 2:
#   schema_version: 2
#   created: ISO time;  command: argv
#   machine: {cpu, cores_logical, cores_physical, memory_gb, memory_bandwidth_gbs: {read, copy, device_copy?}, gpu, python,
#             versions, device_bandwidth_error?}; device_copy (provider cuda): GB/s of a device-to-device copy on the
#             GPU, measured in the run; the floor and bandwidth figures use it on CUDA (report.floor_bandwidth)
#   settings: Settings fields
#   systems: [{name, kind, precision, provider, path, threads, load_s, size_bytes, weights_bytes_per_token,
#              peak_rss_mb, gpu_peak_mb?, accuracy: manifest parity/accuracy figures or null;
#              ours also: fused_ops, quantization, shape [n_layer, n_embd], cuda_graph (the session was created with
#              enable_cuda_graph); pytorch-compile also: compiled (its decode step compiled: CUDA only)}]
#   skipped: [{baseline, reason}]
#   records: one per measurement run: {system, scenario, repeat, batch, prompt_len, new_tokens,
#             ttft_ms, p50_ms, p90_ms, p99_ms, mean_ms, total_s, tokens_per_s, decode_tokens_per_s};
#            scenario chat: one per turn, prompt_len = the history so far, plus cached_tokens (the
#            prompt tokens that did not run again);
#            scenario concurrent: one per (system, mode, clients, repeat): {system, scenario, mode
#             (scheduler | serial | static), repeat, clients, max_batch, requests, tokens (generated,
#             = the sum of reply lengths), wall_s (first submission to last token), requests_per_s,
#             tokens_per_s, ttft_p50_ms, ttft_p99_ms (submission to first token, queue wait included),
#             itl_p50_ms, itl_p99_ms (over every gap between consecutive tokens of a request),
#             max_stall_ms (the largest such gap)}
#   summary: medians over repeats, one per (system, scenario, batch, prompt_len): same figures, plus
#            achieved_gbs (weights_bytes_per_token / p50) and bandwidth_fraction (of the measured bandwidth
#            report.floor_bandwidth picks: the GPU's device copy on CUDA, else the host's read bandwidth);
#            concurrent: one per (system, mode, clients): {system, scenario, mode, clients, max_batch,
#            requests, tokens, repeats} + the medians of the record's figures
#   concurrent: the request mix, or null when skipped: {prompt_len: [lo, hi], reply_len: [lo, hi]
#               (uniform, inclusive, after clipping to n_positions), clients, requests per clients}


@dataclass
class Settings:
    artifacts: list[str]
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    batch: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    prompt_len: list[int] = field(default_factory=lambda: [32, 128, 512])
    new_tokens: int = 64
    repeats: int = 5
    context: list[int] = field(default_factory=lambda: [50, 300, 600, 900, 1000])
    context_new_tokens: int = 16
    # a DialoGPT conversation: turns of user messages and fixed-length replies (0 turns = skip)
    chat_turns: int = 8
    chat_user_len: int = 24
    chat_reply_len: int = 16
    # closed-loop clients sending requests back to back (empty or 0 = skip); see concurrent_plan
    concurrent_clients: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    # per point; 0 = max(2C, 64): at C <= 16 four or more requests per client, so the ramp-up (all
    # prompts at once) and the tail (a partly filled batch) do not dominate the figure
    concurrent_requests: int = 0
    concurrent_repeats: int = 3
    concurrent_precisions: list[str] = field(default_factory=lambda: ["int8"])  # none given: the first artifact
    concurrent_max_batch: int = 64  # the scheduler's and static batching's batch: min(C, this)
    concurrent_prompt_len: list[int] = field(default_factory=lambda: [16, 256])  # uniform, inclusive
    concurrent_reply_len: list[int] = field(default_factory=lambda: [16, 128])
    provider: str = "cpu"
    threads: int = 0  # 0 = one per core
    out: str = "reports/latest"
    # a fresh process per system loads and generates once for its peak RSS (and ours' breakdown)
    footprint: bool = True
    beams: int = 4  # beam search speed: 1 vs this many beams at batch 1 (0 = skip)
    cache: str = "artifacts/bench-cache"  # baseline checkpoints, optimum exports and anchor conversions, reused
    llamacpp_src: str = anchors.LLAMACPP_SRC  # the llama.cpp sources `make llamacpp` unpacks (its GGUF converter)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings(artifacts=[])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR", help="artifact directories to measure")
    p.add_argument("--baselines", default=",".join(d.baselines),
                   help=f"comma list of {', '.join(BASELINES)} ('' for none; default all, those not installed are skipped "
                        "with the reason: llamacpp needs `make llamacpp`)")
    p.add_argument("--batch", type=ints, default=d.batch, help="batch sizes for throughput (default 1,4,16,64)")
    p.add_argument("--prompt-len", type=ints, default=d.prompt_len, help="prompt lengths for time to first token")
    p.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=d.repeats, help="timed repeats (median reported)")
    p.add_argument("--context", type=ints, default=d.context, help="context lengths of the latency curve")
    p.add_argument("--context-new-tokens", type=int, default=d.context_new_tokens, help="tokens per context point")
    p.add_argument("--chat-turns", type=int, default=d.chat_turns, help="turns of the chat scenario (0 = skip)")
    p.add_argument("--chat-user-len", type=int, default=d.chat_user_len, help="tokens per user message in the chat scenario")
    p.add_argument("--chat-reply-len", type=int, default=d.chat_reply_len, help="tokens per reply in the chat scenario")
    p.add_argument("--concurrent-clients", type=ints, default=d.concurrent_clients,
                   help="closed-loop clients per point of the concurrent scenario ('' or 0 = skip; default 1,4,16,64)")
    p.add_argument("--concurrent-requests", type=int, default=d.concurrent_requests,
                   help="requests per concurrent point, the same list for every system (0 = max(2C, 64)). The serial systems "
                        "take this many requests' time per point: on 2 cores DialoGPT-small int8 ~0.3 s and optimum ~1.2 s a "
                        "request, so the defaults add ~30 min to make bench (~8 min without optimum)")
    p.add_argument("--concurrent-repeats", type=int, default=d.concurrent_repeats, help="timed repeats of the concurrent scenario")
    p.add_argument("--concurrent-precisions", type=lambda v: [x for x in v.split(",") if x], default=d.concurrent_precisions,
                   help="artifacts of these precisions get the concurrent scenario (default int8; none given: the first artifact)")
    p.add_argument("--concurrent-max-batch", type=int, default=d.concurrent_max_batch,
                   help="batch of the scheduler and of static batching: min(clients, this)")
    p.add_argument("--concurrent-prompt-len", type=ints, default=d.concurrent_prompt_len, metavar="LO,HI",
                   help="prompt lengths, uniform (default 16,256; both ranges shrink to fit the model's positions)")
    p.add_argument("--concurrent-reply-len", type=ints, default=d.concurrent_reply_len, metavar="LO,HI",
                   help="reply lengths, uniform, every reply exactly its length (default 16,128)")
    p.add_argument("--beams", type=int, default=d.beams, help="beam search scenario: 1 vs this many beams (0 = skip)")
    p.add_argument("--no-footprint", dest="footprint", action="store_false",
                   help="skip the fresh-process memory measurement per system")
    p.add_argument("--bench-provider", dest="provider", default=d.provider, help="cpu | cuda for every system")
    p.add_argument("--threads", type=int, default=d.threads, help="intra-op threads for every system (0 = per core)")
    p.add_argument("--out", default=d.out, help="report directory")
    p.add_argument("--cache", default=d.cache, help="where baseline checkpoints and exports are kept")
    p.add_argument("--llamacpp-src", default=d.llamacpp_src, help="llama.cpp sources with convert_hf_to_gguf.py "
                   "(default: where `make llamacpp` puts them)")


def main(args: argparse.Namespace) -> None:
    s = Settings(artifacts=args.artifacts, baselines=[b for b in args.baselines.split(",") if b], batch=args.batch,
                 prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, context=args.context,
                 context_new_tokens=args.context_new_tokens, chat_turns=args.chat_turns, chat_user_len=args.chat_user_len,
                 chat_reply_len=args.chat_reply_len, concurrent_clients=args.concurrent_clients,
                 concurrent_requests=args.concurrent_requests, concurrent_repeats=args.concurrent_repeats,
                 concurrent_precisions=args.concurrent_precisions, concurrent_max_batch=args.concurrent_max_batch,
                 concurrent_prompt_len=args.concurrent_prompt_len, concurrent_reply_len=args.concurrent_reply_len,
                 provider=args.provider, threads=args.threads, footprint=args.footprint, beams=args.beams,
                 out=args.out, cache=args.cache, llamacpp_src=args.llamacpp_src)
    results = run(s, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {s.out}/report.md ({len(results['records'])} measurements)")


def baseline_missing(kind: str, llamacpp_src: str = anchors.LLAMACPP_SRC) -> str | None:
    """Why a baseline cannot run here, or None."""
    if kind in ("llamacpp", "ctranslate2"):
        return anchors.missing(kind, llamacpp_src)
    need = {"pytorch": ["torch", "transformers"], "pytorch-compile": ["torch", "transformers"],
            "optimum": ["torch", "transformers", "optimum.onnxruntime"]}[kind]
    for mod in need:
        try:
            if importlib.util.find_spec(mod) is None:
                raise ImportError
        except (ImportError, ValueError):
            pkg = "optimum-onnx" if mod.startswith("optimum") else mod
            return f"{pkg} is not installed (pip install 'gpt2onnx[bench]' or {pkg})"
    return None


def run(s: Settings, log=print) -> dict:
    """Measure, then write results.json, results.csv, report.md and plots into `s.out`."""
    _check_settings(s)
    manifests = [load_manifest(a, verify="sha256") for a in s.artifacts]  # a damaged artifact stops here
    n_positions = min(m.config["n_positions"] for m in manifests)
    contexts = [c for c in s.context if c + s.context_new_tokens <= n_positions]
    specs = [SystemSpec(f"ours {m.precision}{'' if m.raw.get('fused', True) else ' unfused'} {s.provider}", "ours", m.path,
                        s.provider, s.threads, m.precision) for m in manifests]
    skipped = []
    for kind in s.baselines:
        why = baseline_missing(kind, s.llamacpp_src)
        if why:
            log(f"skipping the {kind} baseline: {why}")
            skipped.append({"baseline": kind, "reason": why})
            continue
        if kind in ("llamacpp", "ctranslate2"):
            got, missed = _anchor_specs(kind, manifests, s, log)
            specs += got
            skipped += missed
            continue
        specs.append(_baseline_spec(kind, manifests[0], s, log))

    machine = machine_info(s.provider)
    bw = machine["memory_bandwidth_gbs"]
    log(f"memory bandwidth: read {bw['read']:.1f} GB/s, copy {bw['copy']:.1f} GB/s"
        + (f", GPU device-to-device copy {bw['device_copy']:.0f} GB/s" if "device_copy" in bw else "")
        + (f"; no GPU bandwidth: {machine['device_bandwidth_error']}" if "device_bandwidth_error" in machine else ""))
    points = [("decode", 1, p, s.new_tokens) for p in s.prompt_len]
    points += [("throughput", b, s.prompt_len[0], s.new_tokens) for b in s.batch if b != 1]
    points += [("context", 1, c, s.context_new_tokens) for c in contexts]
    chat_turns = min(s.chat_turns, n_positions // (s.chat_user_len + s.chat_reply_len + 2))
    if chat_turns < s.chat_turns:
        log(f"chat scenario: {chat_turns} of {s.chat_turns} turns fit the {n_positions}-position context")
    conc = concurrent_plan(s, n_positions, log)

    workers: list[Worker] = []
    systems: list[dict] = []
    records: list[dict] = []
    # baselines whose process died, or that answered with an error (a compile that failed): dropped with the
    # reason, their figures too; ours is never dropped
    dead: set[str] = set()

    def died(spec: SystemSpec, e: WorkerDied | WorkerError, doing: str) -> None:
        if spec.kind == "ours":
            if isinstance(e, WorkerError):
                raise e
            raise Gpt2OnnxError(f"{spec.name}: {e} while {doing}") from None
        log(f"dropping the {spec.name} baseline: {e} while {doing}")
        skipped.append({"baseline": spec.name, "reason": f"{e} while {doing}"})
        dead.add(spec.name)

    def ask(w: Worker, doing: str, kind: str, **args) -> dict | None:
        try:
            return w.request(kind, **args)
        except (WorkerDied, WorkerError) as e:
            died(w.spec, e, doing)
            return None

    try:
        for spec in specs:
            log(f"loading {spec.name}")
            try:
                w = Worker(spec)
            except (WorkerDied, WorkerError) as e:
                died(spec, e, "loading")
                continue
            workers.append(w)
            systems.append(_system_record(spec, w.loaded, manifests))
        from rich.progress import Progress

        conc_runs = _concurrent_runs(s, workers) if conc else []
        conc_clients = conc["clients"] if conc_runs else []
        conc_repeats = s.concurrent_repeats if conc_runs else 0
        total = (sum(_fits(w, p[1]) for p in points for w in workers) + bool(chat_turns) * len(workers)) * (s.repeats + 1)
        total += len(conc_clients) * len(conc_runs) * (conc_repeats + 1)
        with Progress(transient=False) as bar:
            task = bar.add_task("measuring", total=total)
            for rep in range(-1, max(s.repeats, conc_repeats)):  # -1 = warm-up, not recorded
                if not bar.console.is_terminal:  # no live bar in a log file: a line per pass instead
                    log("warm-up" if rep < 0 else f"repeat {rep + 1}/{max(s.repeats, conc_repeats)}")
                for scenario, batch, plen, new in points if rep < s.repeats else []:
                    for w in [w for w in workers if _fits(w, batch) and w.spec.name not in dead]:  # llama.cpp: batch 1 only
                        bar.update(task, description=f"{'warm-up' if rep < 0 else f'repeat {rep + 1}/{s.repeats}'} "
                                                     f"{scenario} b{batch} p{plen} {w.spec.name}")
                        time.sleep(SETTLE_S)
                        n = new if rep >= 0 else min(new, 4)
                        r = ask(w, f"{scenario} b{batch} p{plen}", "generate", batch=batch, prompt_len=plen, new_tokens=n)
                        if r is None:
                            continue
                        if len(r["tokens"]) != batch or any(len(t) != n for t in r["tokens"]):  # a bug, not a figure
                            raise Gpt2OnnxError(f"{w.spec.name}: asked for {batch} rows of {n} tokens, got "
                                                f"{[len(t) for t in r['tokens']]}")
                        if rep >= 0:
                            records.append(_record(w.spec.name, scenario, rep, batch, plen, new, r))
                        bar.advance(task)
                for w in [w for w in workers if w.spec.name not in dead] if chat_turns and rep < s.repeats else []:
                    bar.update(task, description=f"{'warm-up' if rep < 0 else f'repeat {rep + 1}/{s.repeats}'} chat {w.spec.name}")
                    time.sleep(SETTLE_S)
                    r = ask(w, "chat", "chat", turns=chat_turns if rep >= 0 else 1, user_len=s.chat_user_len,
                            reply_len=s.chat_reply_len)
                    if r is not None and rep >= 0:
                        records += [_record(w.spec.name, "chat", rep, 1, t["prompt_len"], s.chat_reply_len, t) for t in r["turns"]]
                    bar.advance(task)
                for clients in conc_clients if rep < conc_repeats else []:
                    n = conc["requests"][clients]
                    for w, mode in [(w, m) for w, m in conc_runs if w.spec.name not in dead]:
                        bar.update(task, description=f"{'warm-up' if rep < 0 else f'repeat {rep + 1}/{conc_repeats}'} "
                                                     f"concurrent c{clients} {w.spec.name} {mode}")
                        time.sleep(SETTLE_S)
                        max_batch = min(clients, s.concurrent_max_batch)
                        # the warm-up: one request per client, 2 tokens each (every batch shape, little time)
                        r = ask(w, f"concurrent c{clients}", "concurrent", mode=mode, clients=clients, requests=n if rep >= 0 else min(n, clients),
                                      prompt_len=conc["prompt_len"], reply_len=conc["reply_len"], reply_cap=0 if rep >= 0 else 2,
                                      max_batch=max_batch)
                        if r is not None and rep >= 0:
                            records.append(_concurrent_record(w.spec.name, mode, rep, clients, max_batch, r["requests"]))
                        bar.advance(task)
        for w, sysrec in zip(workers, systems):
            if w.spec.name not in dead:
                sysrec.update(ask(w, "reporting its memory", "memory") or {})
    finally:
        for w in workers:
            w.close()
    specs = [sp for sp in specs if sp.name not in dead]  # nothing of a dead baseline is reported but why
    systems = [r for r in systems if r["name"] not in dead]
    records = [r for r in records if r["system"] not in dead]
    if s.footprint:
        footprint(specs, systems, s, log)
    beams = beam_speeds(specs, s, log) if s.beams else {}

    results = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "machine": machine,
        "settings": asdict(s),
        "systems": systems,
        "skipped": skipped,
        "concurrent": conc,
        "beams": beams,
        "records": records,
        "summary": summarize(records, systems, machine, s.provider),
    }
    write(results, s.out)
    return results


def footprint(specs: list[SystemSpec], systems: list[dict], s: Settings, log) -> None:
    """Peak resident memory of a fresh process per system that loads it and generates once (batch 1,
    the first prompt length, new_tokens): what an edge deployment pays, free of the other scenarios'
    batches. For ours, also the stage-by-stage breakdown (benchmarks/memory.py)."""
    from gpt2onnx.benchmarks import memory

    for spec, sysrec in zip(specs, systems):
        log(f"footprint of {spec.name}")
        try:
            w = Worker(spec)
            try:
                w.request("generate", batch=1, prompt_len=s.prompt_len[0], new_tokens=s.new_tokens)
                sysrec["footprint_mb"] = w.request("memory")["peak_rss_mb"]
            finally:
                w.close()
        except (WorkerDied, WorkerError) as e:
            if spec.kind == "ours":
                raise Gpt2OnnxError(f"{spec.name}: {e} while measuring its footprint") from None
            log(f"no footprint for {spec.name}: {e}")  # its memory table cell stays empty
        if spec.kind == "ours" and spec.provider == "cpu":
            sysrec["memory_stages"] = memory.footprint(spec.path, s.prompt_len[0], s.new_tokens)["stages"]


def beam_speeds(specs: list[SystemSpec], s: Settings, log) -> dict[str, list[dict]]:
    """Beam search at batch 1 (benchmarks/beam_speed.py): 1 and `s.beams` beams, interleaved, for each
    of our artifacts, in this process after the workers are gone."""
    from gpt2onnx.benchmarks.beam_speed import measure
    from gpt2onnx.runtime import Engine

    out = {}
    for spec in (x for x in specs if x.kind == "ours"):
        log(f"beam search: {spec.name}")
        engine = Engine.load(spec.path, provider=spec.provider, threads=spec.threads or None, verify="size")
        out[spec.name] = measure(engine, (1, s.beams), s.prompt_len[0], s.new_tokens, s.repeats)
        del engine
    return out


def _fits(w: Worker, batch: int) -> bool:
    return batch <= w.loaded.get("max_batch", batch)


def _check_settings(s: Settings) -> None:
    unknown = [b for b in s.baselines if b not in BASELINES]
    if unknown:
        raise Gpt2OnnxError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    if s.repeats < 1 or s.new_tokens < 2:
        raise Gpt2OnnxError("--repeats must be >= 1 and --new-tokens >= 2")
    if not s.batch or not s.prompt_len or min(s.batch + s.prompt_len) < 1:
        raise Gpt2OnnxError("--batch and --prompt-len need positive integers")
    if s.chat_turns < 0 or (s.chat_turns and (s.chat_user_len < 1 or s.chat_reply_len < 2)):
        raise Gpt2OnnxError("--chat-turns must be >= 0, --chat-user-len >= 1 and --chat-reply-len >= 2")
    if any(c < 0 for c in s.concurrent_clients) or (any(s.concurrent_clients) and (
            s.concurrent_requests < 0 or s.concurrent_repeats < 1 or s.concurrent_max_batch < 1)):
        raise Gpt2OnnxError("--concurrent-clients must be >= 0, --concurrent-requests >= 0, --concurrent-repeats >= 1 "
                            "and --concurrent-max-batch >= 1")
    for name, rng, lo in (("prompt", s.concurrent_prompt_len, 1), ("reply", s.concurrent_reply_len, 2)):
        if len(rng) != 2 or not lo <= rng[0] <= rng[1]:
            raise Gpt2OnnxError(f"--concurrent-{name}-len takes LO,HI with {lo} <= LO <= HI, got {','.join(map(str, rng))}")
    unknown = [p for p in s.concurrent_precisions if p not in PRECISIONS]
    if unknown:
        raise Gpt2OnnxError(f"unknown precision {unknown[0]!r} in --concurrent-precisions; choose from {', '.join(PRECISIONS)}")
    if s.provider not in ("cpu", "cuda"):
        raise Gpt2OnnxError(f"unknown provider {s.provider!r}; choose cpu or cuda")


def concurrent_plan(s: Settings, n_positions: int, log=print) -> dict | None:
    """The concurrent scenario's request mix, or None when it is skipped.

    Prompt and reply ranges shrink by one factor until the longest prompt plus the longest reply fit
    the model's positions (a static batch pads every row to its longest prompt and runs its longest
    reply). Returns {clients, requests: {C: requests per point}, prompt_len: [lo, hi], reply_len: [lo, hi]}."""
    clients = [c for c in s.concurrent_clients if c > 0]
    if not clients:
        return None
    (p_lo, p_hi), (r_lo, r_hi) = s.concurrent_prompt_len, s.concurrent_reply_len
    f = min(1.0, n_positions / (p_hi + r_hi))
    prompt = [max(1, int(p_lo * f)), max(1, int(p_hi * f))]
    reply = [max(2, int(r_lo * f)), max(2, int(r_hi * f))]
    if prompt[1] + reply[1] > n_positions:
        raise Gpt2OnnxError(f"concurrent requests cannot fit the {n_positions}-position context; pass --concurrent-clients 0")
    if f < 1:
        log(f"concurrent scenario: prompts {prompt[0]}-{prompt[1]} and replies {reply[0]}-{reply[1]} tokens "
            f"fit the {n_positions}-position context")
    return {"clients": clients, "requests": {c: s.concurrent_requests or max(2 * c, 64) for c in clients},
            "prompt_len": prompt, "reply_len": reply}


def _concurrent_runs(s: Settings, workers: list[Worker]) -> list[tuple[Worker, str]]:
    """(worker, mode) pairs of the concurrent scenario: our artifacts of the chosen precisions (or the
    first artifact) in every mode, then optimum serially. The scheduler needs a fused artifact."""
    ours = [w for w in workers if w.spec.kind == "ours"]
    chosen = [w for w in ours if w.spec.precision in s.concurrent_precisions] or ours[:1]
    http = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "httpx"))  # mode http needs the serve extra
    runs = [(w, mode) for w in chosen for mode in OURS_MODES
            if (mode not in ("scheduler", "http") or w.loaded["manifest"].get("fused", True)) and (mode != "http" or http)]
    return runs + [(w, "serial") for w in workers if w.spec.kind == "optimum"]


def _baseline_spec(kind: str, m, s: Settings, log) -> SystemSpec:
    """Baselines run the checkpoint the first artifact came from, prepared once into the cache."""
    hf = _hf_checkpoint(m, s.cache, log)
    precision = "fp16" if (kind in ("pytorch", "pytorch-compile") and s.provider == "cuda") else "fp32"
    if kind == "pytorch":
        return SystemSpec(f"pytorch {precision} {s.provider}", "pytorch", hf, s.provider, s.threads, precision)
    if kind == "pytorch-compile":  # compiled on CUDA only (systems._PyTorchCompiled): named for what runs
        label = "pytorch-compile" if s.provider == "cuda" else "pytorch-static"
        return SystemSpec(f"{label} {precision} {s.provider}", kind, hf, s.provider, s.threads, precision)
    out = os.path.join(s.cache, "optimum-" + os.path.basename(hf.rstrip("/")))
    if not os.path.isfile(os.path.join(out, "model.onnx")):
        log(f"exporting the optimum baseline to {out} (optimum's defaults)")
        from optimum.onnxruntime import ORTModelForCausalLM

        tmp = out + ".tmp"
        ORTModelForCausalLM.from_pretrained(hf, export=True).save_pretrained(tmp)
        os.replace(tmp, out)
    return SystemSpec(f"optimum fp32 {s.provider}", "optimum", out, s.provider, s.threads, "fp32")


def _anchor_specs(kind: str, manifests, s: Settings, log) -> tuple[list[SystemSpec], list[dict]]:
    """One llama.cpp or CTranslate2 system per precision of the artifacts (in their order), converted
    from the checkpoint the first artifact came from. A precision it has no counterpart for, or whose
    conversion fails, comes back as a skipped entry with the reason."""
    hf = _hf_checkpoint(manifests[0], s.cache, log)
    specs, skipped = [], []
    for precision in dict.fromkeys(m.precision for m in manifests):
        why = _anchor_unfit(kind, precision, s.provider)
        if not why:
            try:
                if kind == "llamacpp":
                    path = anchors.gguf_model(hf, s.cache, precision, s.llamacpp_src, log)
                    name = f"llama.cpp {anchors.GGUF_TYPES[precision]} cpu"
                else:
                    path = anchors.ctranslate2_model(hf, s.cache, precision, log)
                    name = f"ctranslate2 {anchors.CT2_TYPES[precision]} {s.provider}"
                specs.append(SystemSpec(name, kind, path, s.provider, s.threads, precision))
                continue
            except Exception as e:  # a failed conversion costs this row, not the whole run
                why = f"conversion failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"skipping the {kind} baseline at {precision}: {why}")
        skipped.append({"baseline": f"{kind} {precision}", "reason": why})
    return specs, skipped


def _anchor_unfit(kind: str, precision: str, provider: str) -> str | None:
    if kind == "llamacpp":
        if provider != "cpu":
            return "make llamacpp builds llama.cpp for CPU only"
        return None if precision in anchors.GGUF_TYPES else f"no GGUF counterpart of {precision}"
    if precision == "int4":
        return "CTranslate2's int4 takes AWQ checkpoints only"
    if precision not in anchors.CT2_TYPES or (precision == "fp16" and provider != "cuda"):
        return f"no CTranslate2 {precision} on {provider}"
    return None


def _hf_checkpoint(m, cache: str, log) -> str:
    src = m.raw["source"]
    if not src.get("synthetic"):
        return src["checkpoint"]
    name = src["checkpoint"].split(":", 1)[1]
    path = os.path.join(cache, f"hf-{name}-seed{src['seed']}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        log(f"saving {src['checkpoint']} (seed {src['seed']}) as a Hugging Face checkpoint in {path}")
        from gpt2onnx.export import checkpoints

        checkpoints.save_hf_checkpoint(checkpoints.load(src["checkpoint"], src["seed"]), path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def _system_record(spec: SystemSpec, loaded: dict, manifests) -> dict:
    rec = {"name": spec.name, "kind": spec.kind, "precision": spec.precision, "provider": loaded.get("provider", spec.provider),
           "path": spec.path, "threads": loaded["threads"], "load_s": loaded["load_s"],
           "weights_bytes_per_token": loaded.get("weights", {}).get("bytes_per_token"),
           "size_bytes": _dir_size(spec.path), "accuracy": None}
    if spec.kind == "ours":
        m = next(m for m in manifests if m.path == spec.path)
        rec["accuracy"] = {**m.raw.get("parity", {}), **m.raw.get("accuracy", {})}
        rec["fused_ops"] = m.raw.get("fused_ops")
        rec["quantization"] = m.raw.get("quantization")
        rec["shape"] = [m.raw["config"]["n_layer"], m.raw["config"]["n_embd"]]  # what the report's per-model bars key on
        rec["cuda_graph"] = loaded.get("cuda_graph")
    if spec.kind == "pytorch-compile":
        rec["compiled"] = loaded.get("compiled")
    return rec


def _dir_size(path: str) -> int | None:
    """Bytes on disk of a model directory's files (or of a single-file model: a GGUF)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    if not os.path.isdir(path):
        return None
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))


def _record(system: str, scenario: str, rep: int, batch: int, plen: int, new: int, r: dict) -> dict:
    steps = np.array(r["step_s"]) * 1e3
    return {
        "system": system, "scenario": scenario, "repeat": rep, "batch": batch, "prompt_len": plen, "new_tokens": new,
        "ttft_ms": r["ttft_s"] * 1e3,
        "p50_ms": float(np.percentile(steps, 50)), "p90_ms": float(np.percentile(steps, 90)),
        "p99_ms": float(np.percentile(steps, 99)), "mean_ms": float(steps.mean()),
        "total_s": r["total_s"], "tokens_per_s": batch * new / r["total_s"],
        "decode_tokens_per_s": batch * len(steps) / (steps.sum() / 1e3),
        **({"cached_tokens": r["cached_tokens"]} if "cached_tokens" in r else {}),
    }


FIGURES = ("ttft_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "total_s", "tokens_per_s", "decode_tokens_per_s")
CONCURRENT_FIGURES = ("wall_s", "requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                      "max_stall_ms")


def concurrent_figures(requests: list[dict]) -> dict:
    """The concurrent scenario's figures from per-request timing records {submitted_s, token_s}
    (perf_counter seconds), whichever system and mode produced them.

    Raises:
        Gpt2OnnxError: a request without tokens, or stamps out of order (a first token before its
            submission, a token not after the one before).
    """
    ttft = np.array([r["token_s"][0] - r["submitted_s"] if r["token_s"] else -1.0 for r in requests])
    gaps = np.concatenate([np.diff(r["token_s"]) for r in requests])
    if (ttft < 0).any() or (gaps <= 0).any():
        raise Gpt2OnnxError("concurrent timing records out of order: a first token before its submission or a token "
                            "not after the one before")
    wall = max(r["token_s"][-1] for r in requests) - min(r["submitted_s"] for r in requests)
    tokens = sum(len(r["token_s"]) for r in requests)
    ttft, gaps = ttft * 1e3, gaps * 1e3
    return {"requests": len(requests), "tokens": tokens, "wall_s": wall, "requests_per_s": len(requests) / wall,
            "tokens_per_s": tokens / wall,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "itl_p50_ms": float(np.percentile(gaps, 50)), "itl_p99_ms": float(np.percentile(gaps, 99)),
            "max_stall_ms": float(gaps.max())}


def _concurrent_record(system: str, mode: str, rep: int, clients: int, max_batch: int, requests: list[dict]) -> dict:
    return {"system": system, "scenario": "concurrent", "mode": mode, "repeat": rep, "clients": clients,
            "max_batch": max_batch, **concurrent_figures(requests)}


def summarize(records: list[dict], systems: list[dict], machine: dict, provider: str) -> list[dict]:
    """Median over repeats per (system, scenario, batch, prompt_len), with achieved bandwidth as a
    fraction of the bandwidth report.floor_bandwidth picks for `provider`; concurrent records per
    (system, mode, clients)."""
    conc: dict[tuple, list[dict]] = {}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["scenario"] == "concurrent":
            conc.setdefault((r["system"], r["mode"], r["clients"]), []).append(r)
            continue
        groups.setdefault((r["system"], r["scenario"], r["batch"], r["prompt_len"]), []).append(r)
    by_name = {s["name"]: s for s in systems}
    _, bw_gbs = floor_bandwidth(machine, provider)
    out = []
    for (system, scenario, batch, plen), rs in groups.items():
        row = {"system": system, "scenario": scenario, "batch": batch, "prompt_len": plen,
               "new_tokens": rs[0]["new_tokens"], "repeats": len(rs)}
        row.update({f: float(np.median([r[f] for r in rs])) for f in FIGURES})
        if "cached_tokens" in rs[0]:
            row["cached_tokens"] = int(np.median([r["cached_tokens"] for r in rs]))
        wb = by_name[system].get("weights_bytes_per_token")
        row["achieved_gbs"] = wb / (row["p50_ms"] / 1e3) / 1e9 if wb else None
        row["bandwidth_fraction"] = row["achieved_gbs"] / bw_gbs if wb else None
        out.append(row)
    for (system, mode, clients), rs in conc.items():
        row = {"system": system, "scenario": "concurrent", "mode": mode, "clients": clients, "max_batch": rs[0]["max_batch"],
               "requests": rs[0]["requests"], "tokens": rs[0]["tokens"], "repeats": len(rs)}
        row.update({f: float(np.median([r[f] for r in rs])) for f in CONCURRENT_FIGURES})
        out.append(row)
    return out


# ---- machine -------------------------------------------------------------------------------------

def memory_bandwidth_gbs(mb: int = 512) -> dict[str, float]:
    """Best of 7: read (an integer max over `mb` MB, one reader per core) and copy (read + write) GB/s.

    An integer max costs one instruction per 8 values, so it is bound by memory, not arithmetic
    (a float sum is not: on the 2-core AVX2 machine it reads 17 GB/s where the max reads 23 GB/s,
    the rate onnxruntime's own M=1 MatMul reaches on a 512 MB weight)."""
    from concurrent.futures import ThreadPoolExecutor

    n = mb * 2**20 // 4
    src = np.ones(n, np.int32)
    dst = np.empty_like(src)
    cores = os.cpu_count() or 1
    parts = np.array_split(src, 4 * cores)
    read = copy = 0.0
    with ThreadPoolExecutor(cores) as pool:
        for _ in range(7):
            t = time.perf_counter()
            list(pool.map(np.max, parts))  # numpy releases the GIL: one reader per core
            read = max(read, src.nbytes / (time.perf_counter() - t) / 1e9)
            t = time.perf_counter()
            np.copyto(dst, src)
            copy = max(copy, 2 * src.nbytes / (time.perf_counter() - t) / 1e9)
    return {"read": read, "copy": copy}


def device_bandwidth_gbs(device: str = "cuda", mb: int = 512, repeats: int = 10) -> float:
    """Memory bandwidth of a torch device, GB/s: the median over `repeats` of a device-to-device copy of
    `mb` MB, counting each byte read and written (2 x mb / time), as CUDA's bandwidthTest counts a
    device-to-device copy. Timed by CUDA events on CUDA (perf_counter elsewhere, which lets a test run
    it on the CPU). Batch-1 decode reads every weight once a token: this is its floor's denominator on a GPU."""
    import torch

    src = torch.ones(mb * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch and the copy kernel's load, untimed
    cuda = src.is_cuda
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    return 2 * src.nbytes / float(np.median(times)) / 1e9


def _device_bandwidth_in_a_process() -> float:
    """device_bandwidth_gbs() in a spawned process of its own: the harness process then holds no CUDA
    context (and no torch) while the workers run. Raises what the measurement raised."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(device_bandwidth_gbs).result(timeout=300)


def machine_info(provider: str) -> dict:
    """The machine: CPU, cores, memory, GPU, versions, and the memory bandwidths the report's floor and
    GB/s columns divide by: the host's (read, copy) always, the GPU's (device_copy) when `provider` is cuda."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores_logical": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        import psutil

        info["cores_physical"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = psutil.virtual_memory().total / 2**30
    except ImportError:
        pass
    info["gpu"] = _gpu_name()
    info["memory_bandwidth_gbs"] = memory_bandwidth_gbs()
    if provider == "cuda":
        try:
            info["memory_bandwidth_gbs"]["device_copy"] = _device_bandwidth_in_a_process()
        except Exception as e:  # e.g. torch without CUDA beside onnxruntime-gpu: the report says which bandwidth it used
            info["device_bandwidth_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    from importlib.metadata import PackageNotFoundError, version

    info["versions"] = {}
    for pkg in ("gpt2onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "tokenizers", "torch", "transformers", "optimum", "optimum-onnx",
                "ctranslate2", "llama_cpp_python"):
        try:
            info["versions"][pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return info


def _gpu_name() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ---- output --------------------------------------------------------------------------------------

def write(results: dict, out: str) -> None:
    from . import report

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        rows = results["records"]
        if rows:
            wr = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # chat rows add a column
            wr.writeheader()
            wr.writerows(rows)
    report.write_report(results, out)
