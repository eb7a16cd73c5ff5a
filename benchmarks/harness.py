"""`gpt2onnx bench`: latency, throughput, memory and accuracy of artifacts beside PyTorch, optimum,
CTranslate2 and llama.cpp.

    settings.py   what to measure (the dataclass, its command line, its checks)
    plan.py       which systems (ours, the baselines prepared or skipped) and which scenario points
    loop.py       the interleaved loop: each repeat runs each point on every system in turn (A B C A B C)
    worker.py     one process per system, answering timing requests; engines/ holds each system's runner
    workloads.py  the same prompts, conversations and request mixes for every system
    clients.py    the concurrent scenario's closed-loop clients
    figures.py    records and medians;  machine.py  the machine and its memory bandwidth
    memory.py     peak and stage-by-stage memory;  results.py  the schema and the writers;  report.py  the report

Figures are medians over repeats. Output: results.json, results.csv, report.md and PNG plots in --out.
"""

from __future__ import annotations

import argparse
import sys

from gpt2onnx.runtime.artifact import load_manifest

from . import figures, loop, memory, plan, results
from .beam_speed import beam_speeds
from .engines import llamacpp
from .machine import machine_info
from .report import floor_bandwidth
from .settings import Settings, check, check_provider, from_args


def main(args: argparse.Namespace) -> None:
    s = from_args(args)
    res = run(s, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {s.out}/report.md ({len(res['records'])} measurements)")


def run(s: Settings, log=print) -> results.Results:
    """Measure, then write results.json, results.csv, report.md and plots into `s.out`.

    Raises:
        Gpt2OnnxError: a bad setting, a damaged artifact, or one of ours failing (a baseline that fails
            is dropped with the reason instead).
    """
    check(s)
    check_provider(s.provider)
    manifests = [load_manifest(a, verify="sha256") for a in s.artifacts]  # a damaged artifact stops here
    plan.check_artifacts(manifests)
    # before the baselines are prepared (downloads, conversions): a prompt that cannot fit stops here
    scenarios = plan.scenarios(s, min(m.config["n_positions"] for m in manifests), log)
    specs, skipped = plan.systems(s, manifests, log)
    machine = machine_info(s.provider)
    _log_bandwidth(machine, log)

    systems, records, workers = loop.measure(s, scenarios, specs, manifests, log)
    skipped += workers.skipped
    # nothing of a dropped baseline is reported but why
    specs = [x for x in specs if x.name not in workers.dead]
    systems = [x for x in systems if x["name"] not in workers.dead]
    records = [x for x in records if x["system"] not in workers.dead]
    if s.footprint:
        memory.systems_footprint(specs, systems, s.prompt_len[0], s.new_tokens, log)
    beams = beam_speeds(specs, s, log) if s.beams else {}
    # llama.cpp's C++ tool at the first decode point, a run per repeat; its rows become the faster of it and the binding
    cpp = {name: llamacpp.median_of(runs) for name, runs in workers.llama_bench.items() if runs and name not in workers.dead}
    summary = figures.summarize(records, systems, machine, s.provider)
    llamacpp.prefer_faster(systems, summary, cpp, floor_bandwidth(machine, s.provider)[1])

    out = results.assemble(s, machine, systems, skipped, scenarios.concurrent, beams, records, summary)
    results.write(out, s.out)
    return out


def _log_bandwidth(machine: dict, log) -> None:
    bw = machine["memory_bandwidth_gbs"]
    log(f"memory bandwidth: read {bw['read']:.1f} GB/s, copy {bw['copy']:.1f} GB/s"
        + (f", GPU device-to-device copy {bw['device_copy']:.0f} GB/s" if "device_copy" in bw else "")
        + (f"; no GPU bandwidth: {machine['device_bandwidth_error']}" if "device_bandwidth_error" in machine else ""))
