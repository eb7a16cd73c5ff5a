"""results.json: its schema as types, its version, and the writers (results.json, results.csv, then the
report from them: report.py renders only what is written here, so `python -m gpt2onnx.benchmarks.report
DIR` re-renders a report from its results.json alone).

SCHEMA_VERSION changes when a field changes meaning or goes away; a field added since (marked
"added" below) is optional, and readers of the version take its absence as "not measured".
1 -> 2: concurrent records and summary rows (no batch or prompt_len), the `concurrent` key.
Added under 2: `beams`, systems' `footprint_mb`, `memory_stages`, `gpu_peak_mb`, `gpu_used_mb`,
`cuda_graph`, `compiled`, machine `memory_bandwidth_gbs.device_copy` and `device_bandwidth_error`,
concurrent mode `http`, `device_pick`.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from typing import TypedDict

from .settings import Settings, nearest_existing
from .worker import SystemSpec

SCHEMA_VERSION = 2


class Bandwidth(TypedDict, total=False):
    read: float  # GB/s, an integer max over 512 MB, one reader per core (machine.memory_bandwidth_gbs)
    copy: float  # GB/s, read + write
    device_copy: float  # added: GB/s of a device-to-device copy on the GPU (provider cuda), measured in the run


class Machine(TypedDict, total=False):
    cpu: str
    cores_logical: int
    cores_physical: int
    memory_gb: float
    python: str
    platform: str
    gpu: str | None  # nvidia-smi's name, None without one
    memory_bandwidth_gbs: Bandwidth  # the floor and GB/s columns divide by one of these (report.floor_bandwidth)
    device_bandwidth_error: str  # added: why there is no device_copy on cuda
    versions: dict[str, str]  # package -> version, those installed


class MemoryStage(TypedDict):
    VmRSS: float  # MB, from memory.status()
    VmHWM: float
    RssAnon: float
    RssFile: float


class System(TypedDict, total=False):
    name: str  # the row label: "ours int8 cpu", "llama.cpp Q8_0 cpu" ...
    kind: str  # ours | pytorch | pytorch-compile | optimum | llamacpp | ctranslate2
    precision: str
    provider: str
    path: str
    threads: int
    load_s: float
    size_bytes: int | None  # on disk
    weights_bytes_per_token: int | None  # what batch-1 decode reads per token
    accuracy: dict | None  # ours: the manifest's parity and accuracy figures; others None
    kv_cache: str | None  # the KV cache's dtype as the system keeps it (numpy's names: float32, float16, int8)
    peak_rss_mb: float  # VmHWM of the worker after every scenario
    footprint_mb: float  # added: VmHWM of a fresh worker that loads and generates once (memory.systems_footprint)
    memory_stages: dict[str, MemoryStage]  # added, ours on cpu: interpreter, imports, tokenizer, session, generate
    gpu_peak_mb: float  # added, torch on cuda: torch.cuda.max_memory_allocated
    gpu_used_mb: float  # added, on cuda: nvidia-smi's figure for the worker
    # ours only
    fused_ops: dict
    quantization: dict | None
    shape: list[int]  # [n_layer, n_embd]: what the report's per-model bars key on
    cuda_graph: bool  # added: the session was created with enable_cuda_graph
    device_pick: bool  # added: greedy's argmax on the device (pick.onnx) in steps of 4 rows or more
    compiled: bool  # added, pytorch-compile only: its decode step compiled (CUDA only)
    llamacpp_path: dict  # added, llama.cpp where its tools are built: both paths at each batch-1 point (prefer_faster)


class Skipped(TypedDict):
    baseline: str  # a kind ("llamacpp"), a kind and precision ("ctranslate2 int4") or a dropped system's name
    reason: str


class Record(TypedDict, total=False):
    """One measurement run of scenario decode | throughput | context | chat (figures.record)."""
    system: str
    scenario: str
    repeat: int
    batch: int
    prompt_len: int  # chat: the history so far
    new_tokens: int
    ttft_ms: float
    p50_ms: float  # decode steps after the first token
    p90_ms: float
    p99_ms: float
    mean_ms: float
    total_s: float
    tokens_per_s: float  # batch * new_tokens / total_s
    decode_tokens_per_s: float  # batch * steps / their time
    cached_tokens: int  # chat only: the prompt tokens that did not run again


class ConcurrentRecord(TypedDict):
    """One run of the concurrent scenario per (system, mode, clients, repeat) (figures.concurrent_figures)."""
    system: str
    scenario: str  # "concurrent"
    mode: str  # scheduler | http | serial | static
    repeat: int
    clients: int
    max_batch: int
    requests: int
    tokens: int  # generated: the sum of reply lengths
    wall_s: float  # first submission to last token
    requests_per_s: float
    tokens_per_s: float
    ttft_p50_ms: float  # submission to first token, queue wait included
    ttft_p99_ms: float
    itl_p50_ms: float  # over every gap between consecutive tokens of a request
    itl_p99_ms: float
    max_stall_ms: float  # the largest such gap


class ConcurrentMix(TypedDict):
    clients: list[int]
    requests: dict[int, int]  # clients -> requests per point
    prompt_len: list[int]  # [lo, hi], uniform, inclusive, after clipping to n_positions
    reply_len: list[int]


class BeamRow(TypedDict):
    """beam_speed.measure: one per beam count, batch 1."""
    num_beams: int
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    prefill_ms: float
    ms_per_token: float
    step_p50_ms: float
    tokens_per_s: float
    vs_one_beam: float | None


class Results(TypedDict):
    schema_version: int  # SCHEMA_VERSION
    created: str  # ISO time, UTC
    command: list[str]  # argv
    machine: Machine
    settings: dict  # Settings' fields
    systems: list[System]
    skipped: list[Skipped]
    concurrent: ConcurrentMix | None  # None when the scenario was skipped
    beams: dict[str, list[BeamRow]]  # added: our system name -> rows; {} when skipped
    records: list[Record | ConcurrentRecord]
    # medians over repeats (figures.summarize): per (system, scenario, batch, prompt_len) a Record's figures
    # without repeat, plus repeats, achieved_gbs and bandwidth_fraction; concurrent: per (system, mode,
    # clients) a ConcurrentRecord's figures without repeat, plus repeats
    summary: list[dict]


def system_entry(spec: SystemSpec, loaded: dict, manifests) -> System:
    """A system's entry from its spec and its worker's load report."""
    rec = {"name": spec.name, "kind": spec.kind, "precision": spec.precision, "provider": loaded.get("provider", spec.provider),
           "path": spec.path, "threads": loaded["threads"], "load_s": loaded["load_s"],
           "weights_bytes_per_token": loaded.get("weights", {}).get("bytes_per_token"),
           "size_bytes": _dir_size(spec.path), "accuracy": None, "kv_cache": loaded.get("kv_cache")}
    if spec.kind == "ours":
        m = next(m for m in manifests if m.path == spec.path)
        rec["accuracy"] = {**m.raw.get("parity", {}), **m.raw.get("accuracy", {})}
        rec["fused_ops"] = m.raw.get("fused_ops")
        rec["quantization"] = m.raw.get("quantization")
        rec["shape"] = [m.raw["config"]["n_layer"], m.raw["config"]["n_embd"]]  # what the report's per-model bars key on
        rec["cuda_graph"] = loaded.get("cuda_graph")
        if loaded.get("device_pick") is not None:
            rec["device_pick"] = loaded["device_pick"]
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


def assemble(s: Settings, machine: Machine, systems: list[System], skipped: list[Skipped], concurrent: ConcurrentMix | None,
            beams: dict, records: list, summary: list[dict]) -> Results:
    """The results.json object of a run measured now with settings `s`."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "machine": machine,
        "settings": asdict(s),
        "systems": systems,
        "skipped": skipped,
        "concurrent": concurrent,
        "beams": beams,
        "records": records,
        "summary": summary,
    }


def write(results: Results, out: str) -> None:
    """results.json, results.csv, then report.md and the plots (report.write_report) into `out`, all or
    nothing (publish)."""
    from . import report

    def fill(tmp: str) -> None:
        with open(os.path.join(tmp, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(tmp, "results.csv"), "w", newline="") as f:
            rows = results["records"]
            if rows:
                wr = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # chat rows add a column
                wr.writeheader()
                wr.writerows(rows)
        report.write_report(results, out, into=tmp)

    publish(out, fill)


def write_json(path: str, doc, indent: int = 2) -> None:
    """`doc` as JSON at `path`, whole or not at all: written beside it, then renamed over it."""
    fd, tmp = tempfile.mkstemp(prefix=".gpt2onnx-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=indent, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def publish(out: str, fill) -> None:
    """Run `fill(tmp)` on a new temporary directory beside `out`, then move each file it wrote into `out`
    (created then): a writer that fails half-way (a plot, a full disk, Ctrl-C) leaves `out` as it was, no
    half-written report or stray directory. The temporary directory sits in the nearest existing ancestor
    of `out`, on its file system, so each move is one rename."""
    path = os.path.abspath(out)
    tmp = tempfile.mkdtemp(prefix=".gpt2onnx-report-", dir=nearest_existing(os.path.dirname(path)))
    try:
        fill(tmp)
        os.makedirs(path, exist_ok=True)
        for name in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
