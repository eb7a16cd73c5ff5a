"""Which CUDA kernels a decode step runs, and how much of its time the GPU is busy.

    python -m gpt2onnx.benchmarks.gpu_kernels ARTIFACT_DIR --out DIR [--batch 1,16] [--steps 20]

The batch-1 bar of issue 19 (<= 1.0 ms a token for DialoGPT-medium fp16) was missed at 1.15 ms with a
captured step whose replay alone takes ~1.04 ms on an H200 (reports/gpu/step.md), ~6x the memory floor.
gpu_step times the replay as one number; this tool says what is inside it. For each batch size, a
Decoder of b rows (prefilled with 32-token prompts, warmed up so the step is captured) decodes `steps`
steps under PyTorch's profiler (CUPTI, which sees every kernel of the process, onnxruntime's too; the
kernels inside a replayed CUDA graph where its build reports them, and the report says when it did not),
once through the captured step and once uncaptured (the same session, gpu_graph_id -1: every kernel
launched from the host). Per step:

  kernels    how many kernels (and copies) the GPU ran, and the sum of their durations
  busy       the union of their intervals: time the GPU did anything; wall - busy is time it waited
             (launch gaps, the host's own work, synchronisation)
  by kind    matmul (cuBLAS / CUTLASS), attention, layer norm, gelu, cast, reduce, copies, other
  top        the kernels that took longest, by name

A step near its memory floor is one whose kernels are few and whose busy time is mostly matmul; many
kernels of a few microseconds each, or a large wall - busy, say where the next change goes (fewer
nodes per layer, fused small ops, host overhead). Needs a PyTorch with CUDA (the GPU image's); on a
CPU-only torch it records why it measured nothing. Writes DIR/kernels.json and DIR/kernels.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time

import numpy as np

from .gpu_check import write_record
from .gpu_step import batch_main, batch_parser, record_header
from .workloads import prompt_rows

PROMPT = 32
WARMUP = 10
STEPS = 20
TOP = 15
# (kind, pattern over a kernel's lower-cased name): the first match names its kind (attention first:
# flash decoding's "splitkv" kernels would match cuBLAS's split-K "splitk")
KINDS = (
    ("attention", r"flash|fmha|xqa|attention|attn|unpackqkv|kvcache|softmax"),
    ("matmul", r"gemm|gemv|xmma|cutlass|splitk|matmul|cublas"),
    ("layer norm", r"layernorm|layer_norm"),
    ("gelu", r"gelu"),
    ("cast", r"cast"),
    ("reduce / argmax", r"reduce|argmax|argmin"),
)


def kind_of(name: str, cat: str) -> str:
    """The kind of one GPU event: copies and memsets by the profiler's category, kernels by name."""
    if cat == "gpu_memcpy":
        return "copy"
    if cat == "gpu_memset":
        return "memset"
    low = name.lower()
    return next((k for k, pat in KINDS if re.search(pat, low)), "other")


MARK = "gpt2onnx: profiled steps"  # the annotation around the profiled steps (the trace's time window)


def summarize(events: list[dict], steps: int, wall_ms: float) -> dict:
    """Per-step figures from a profiler trace's events (Chrome trace format, as torch.profiler exports):
    the complete ("X") events of category kernel / gpu_memcpy / gpu_memset that start inside the MARK
    annotation (all of them where it is absent), over `steps` steps that took `wall_ms` in all.
    Times in the trace are microseconds."""
    mark = next((e for e in events if e.get("cat") == "user_annotation" and e.get("name") == MARK), None)
    since = float(mark["ts"]) if mark else -np.inf  # each step synchronises: the warm-up's events end before it
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
           and float(e["ts"]) >= since]
    busy, end = 0.0, -np.inf
    for e in sorted(gpu, key=lambda e: float(e["ts"])):  # the union of the intervals (streams may overlap)
        s, d = float(e["ts"]), float(e["dur"])
        if s + d > end:
            busy += s + d - max(s, end)
            end = s + d
    names: dict[str, list] = {}
    kinds: dict[str, list] = {}
    for e in gpu:
        k = kind_of(e["name"], e["cat"])
        for table, key in ((names, e["name"]), (kinds, k)):
            row = table.setdefault(key, [0, 0.0, k])
            row[0] += 1
            row[1] += float(e["dur"])
    total = sum(v[1] for v in kinds.values())

    def per_step(table: dict) -> list[dict]:
        rows = [{"name": key, "kind": v[2], "calls": v[0] / steps, "us": v[1] / steps, "share": v[1] / total if total else 0.0}
                for key, v in table.items()]
        return sorted(rows, key=lambda r: -r["us"])

    return {"steps": steps, "wall_ms": wall_ms / steps, "events": len(gpu) / steps, "kernel_us": total / steps,
            "busy_us": busy / steps, "by_kind": [{k: v for k, v in r.items() if k != "kind"} for r in per_step(kinds)],
            "top": [dict(r, name=r["name"][:300]) for r in per_step(names)[:TOP]],
            "distinct": len(names)}


def _profile(e, b: int, steps: int, captured: bool, gpu: bool) -> dict:
    """A fresh Decoder of b rows: prefilled, WARMUP steps (the first captured one captures), then `steps`
    steps inside the MARK annotation, all under torch.profiler, so the capture happens while it records
    (CUPTI may only see a graph's kernels when it was already on as the graph was made). `gpu` records the
    CUDA activity beside the CPU's (the annotation's); the tests record the CPU alone, no GPU event."""
    from torch.profiler import ProfilerActivity, profile, record_function

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        dec = e.decoder(b, e.n_positions, captured=captured)
        dec.prefill(0, prompt_rows(b, PROMPT, e.vocab_size))
        tokens = np.zeros(b, np.int64)
        for _ in range(WARMUP):
            dec.decode(tokens)
        with record_function(MARK):
            t0 = time.perf_counter()
            for _ in range(steps):
                dec.decode(tokens)
            wall = (time.perf_counter() - t0) * 1e3
        dec.close()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    return summarize(events, steps, wall)


def _batch(e, b: int, steps: int, gpu: bool = True) -> dict:
    out = {"batch": b}
    for mode, captured in (("captured", True), ("uncaptured", False)):
        if mode == "captured" and not e.cuda_graph:
            continue
        out[mode] = _profile(e, b, steps, captured, gpu)
    return out


def measure(artifact: str, provider: str, batches: list[int], steps: int = STEPS, log=print, save=None) -> dict:
    from gpt2onnx.runtime import Engine
    from gpt2onnx.runtime.errors import one_line

    e = Engine.load(artifact, provider=provider, verify="size", device_pick=False)  # the logits path: every row's step
    r = {**record_header(e, artifact), "prompt": PROMPT, "batches": []}
    try:
        import torch
        from torch.profiler import ProfilerActivity, supported_activities

        r["torch"] = torch.__version__
        if ProfilerActivity.CUDA not in supported_activities():
            r["skipped"] = f"torch {torch.__version__} cannot profile CUDA (a CPU-only build): no kernels to list"
    except ImportError:
        r["skipped"] = "torch is not installed: its profiler is what lists the kernels"
    if "skipped" in r:
        return r
    for b in batches:
        log(f"kernels at batch {b}")
        try:
            r["batches"].append(_batch(e, b, steps))
        except Exception as err:  # onnxruntime and the profiler raise their own types; the failure is the finding
            r["batches"].append({"batch": b, "error": one_line(err)})
        save and save(r)
    return r


def render(r: dict) -> list[str]:
    L = [f"{r['created']} · {r['checkpoint']} {r['precision']} · provider {r['provider']} · onnxruntime {r['onnxruntime']}"
         f"{' · torch ' + r['torch'] if r.get('torch') else ''} · session with enable_cuda_graph: "
         f"{'yes' if r['session_cuda_graph'] else 'no'}", ""]
    if r.get("skipped"):
        return L + [f"Not measured: {r['skipped']}."]
    L += [f"Decode steps over rows prefilled with {r['prompt']}-token prompts, after {WARMUP} warm-up steps, under "
          "torch.profiler (CUPTI): per step, the GPU's kernels and copies, the sum of their durations, and busy = the "
          "union of their intervals; wall = the steps' own time under the profiler / steps (profiling adds a little). "
          "wall - busy is time the GPU waited: launch gaps, the host's work, synchronisation.", "",
          "| batch | step | wall ms | busy ms | idle | kernels + copies | distinct | kernel time ms |",
          "|---|---|---|---|---|---|---|---|"]
    done = []
    for b in r["batches"]:
        if "error" in b:
            L.append(f"| {b['batch']} | **failed**: {b['error']} |")
            continue
        for mode in ("captured", "uncaptured"):
            if mode in b:
                s = b[mode]
                idle = 1 - s["busy_us"] / 1e3 / s["wall_ms"] if s["wall_ms"] else 0.0
                L.append(f"| {b['batch']} | {mode} | {s['wall_ms']:.3f} | {s['busy_us'] / 1e3:.3f} | {idle:.0%} | "
                         f"{s['events']:.0f} | {s['distinct']} | {s['kernel_us'] / 1e3:.3f} |")
                done.append((b["batch"], mode, s))
    blind = [b["batch"] for b in r["batches"] if "captured" in b and b["captured"]["events"] < b["uncaptured"]["events"] / 2]
    if blind:
        L += ["", f"At batch {', '.join(map(str, blind))} the profiler saw under half as many events in the captured step "
              "as uncaptured: it does not see inside replayed graphs here, so the captured rows count copies and the "
              "replay's busy time is not known; read kernels from the uncaptured rows."]
    for batch, mode, s in done:
        L += ["", f"### Batch {batch}, {mode}: by kind", "", "| kind | per step | µs per step | share |", "|---|---|---|---|"]
        L += [f"| {k['name']} | {k['calls']:.1f} | {k['us']:.1f} | {k['share']:.0%} |" for k in s["by_kind"]]
        L += ["", f"Longest kernels ({len(s['top'])} of {s['distinct']}):", "",
              "| kernel | kind | per step | µs per step | µs per call |", "|---|---|---|---|---|"]
        L += [f"| `{t['name'][:110]}` | {t['kind']} | {t['calls']:.1f} | {t['us']:.1f} | {t['us'] / t['calls']:.2f} |"
              for t in s["top"]]
    return L


def write(r: dict, out: str) -> None:
    write_record(out, "kernels", "Which kernels a decode step runs", r, render(r))


def parser() -> argparse.ArgumentParser:
    return batch_parser("gpu_kernels", __doc__, "kernels.json and kernels.md", "1,16", STEPS)


def main(argv: list[str] | None = None) -> None:
    batch_main(parser(), argv, measure, write, render)


if __name__ == "__main__":
    main()
