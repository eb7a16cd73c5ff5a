"""Measure int8 and int4 quantization choices: accuracy (teacher-forced, from the export) and speed.

    python -m gpt2onnx.benchmarks.quant_sweep [synthetic:dialogpt-small] [--out reports/quant-sweep.json]

Every configuration is exported (tolerances not enforced, so every figure is seen), its size and the
peak RSS of a fresh process that loads and generates once are taken, then all are timed interleaved
beside the fp32 export (once the machine is quiet): batch 1, prompt 32, 48 new tokens, median of 3 rounds.
The defaults in export/quantize.py come from this table.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings

import numpy as np

from gpt2onnx.benchmarks import memory
from gpt2onnx.export.convert import ExportOptions, export
from gpt2onnx.export.quantize import Int4Config, Int8Config

# (precision, export options, engine options); every row is exported, measured and kept in the
# report, chosen or not. Earlier sweeps (per-tensor int8, asymmetric int4, block 16) are in git history.
CONFIGS = [
    ("fp32", {}, {}),
    ("int8", {"int8": Int8Config()}, {}),
    ("int8", {"int8": Int8Config(embedding=False)}, {}),  # before: fp32 embedding, dynamic head
    ("int8", {"int8": Int8Config(reduce_range=False)}, {}),
    ("int8", {"int8": Int8Config(method="nbits")}, {}),
    ("int8", {"int8": Int8Config(method="nbits", block_size=128)}, {}),
    ("int4", {"int4": Int4Config()}, {}),
    ("int4", {"int4": Int4Config(embedding=False)}, {}),  # before: fp32 embedding
    ("int4", {"int4": Int4Config(block_size=64)}, {}),
    ("int4", {"int4": Int4Config(block_size=128)}, {}),
    ("int4", {"int4": Int4Config(accuracy_level=0)}, {}),
    ("int4", {"int4": Int4Config()}, {"threads": 1}),
    ("int4", {"int4": Int4Config(head_bits=4)}, {}),
    ("int4", {"int4": Int4Config(head_bits=8)}, {}),
]


def main() -> None:
    from .settings import ToolParser, int_list

    ap = ToolParser(prog="python -m gpt2onnx.benchmarks.quant_sweep", description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="synthetic:dialogpt-small")
    ap.add_argument("--out", default="reports/quant-sweep.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", type=int_list, help="comma-separated indices into CONFIGS to run (default all; 0, fp32, is "
                                      "always run: the time base)")
    args = ap.parse_args()
    ap.at_least(args, rounds=1)
    ap.output_file(args.out, "--out")
    configs = CONFIGS
    if args.configs:
        picked = sorted({0, *args.configs})
        if picked[0] < 0 or picked[-1] >= len(CONFIGS):
            ap.error(f"--configs takes comma-separated indices from 0 to {len(CONFIGS) - 1}, got {','.join(map(str, args.configs))}")
        configs = [CONFIGS[i] for i in picked]
    warnings.simplefilter("ignore")
    from gpt2onnx.runtime import Engine

    rows = []
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(args.out)) or ".") as tmp:
        for i, (precision, kw, engine_kw) in enumerate(configs):
            path = export(ExportOptions(args.model, os.path.join(tmp, str(i)), precision=precision,
                                        enforce_tolerances=False, **kw), log=lambda m: None)
            m = json.load(open(os.path.join(path, "gpt2onnx.json")))
            rows.append({"precision": precision, "config": {**(m["quantization"] or {}), **engine_kw}, "path": path,
                         "accuracy": m["accuracy"]["teacher_forced"], "weights_mb": m["weights"]["bytes_per_token"] / 1e6,
                         "size_mb": sum(f["bytes"] for f in m["files"].values()) / 1e6,
                         "peak_rss_mb": memory.footprint(path, threads=engine_kw.get("threads"))["peak_mb"]})
            print(f"exported {i + 1}/{len(configs)} {precision} {rows[-1]['config']}", flush=True)
        wait_for_quiet()
        engines = [Engine.load(r["path"], provider="cpu", verify="size", **kw) for r, (_, _, kw) in zip(rows, configs)]
        prompt = [list(range(1000, 1032))]
        times = [[] for _ in rows]
        ttft = [[] for _ in rows]
        for rnd in range(args.rounds + 1):  # round 0 warms up
            for j, e in enumerate(engines):
                time.sleep(0.2)
                e.generate(prompt, max_new_tokens=48, eos_token_id=-1)
                if rnd:
                    times[j].append(float(np.median(e.stats.step_s)) * 1e3)
                    ttft[j].append(e.stats.ttft_s * 1e3)
    base = float(np.median(times[0]))
    for r, t, f in zip(rows, times, ttft):
        r.pop("path")
        r["p50_ms"], r["ttft_ms"], r["vs_fp32"] = float(np.median(t)), float(np.median(f)), float(np.median(t)) / base
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    from .results import write_json

    write_json(args.out, {"model": args.model, "rows": rows})
    print(f"{'precision':9s} {'config':90s} {'MB':>5s} {'RSS':>5s} {'MB/tok':>7s} {'ms/tok':>7s} {'×fp32':>6s} {'TTFT':>6s} "
          f"{'KL':>9s} {'top-1':>6s} {'ppl %':>7s}")
    for r in rows:
        c = {k: v for k, v in (r["config"] or {}).items() if k not in ("weight_type", "exclude", "batch_invariant", "method", "symmetric", "embedding", "lm_head")}
        a = r["accuracy"]
        print(f"{r['precision']:9s} {str(c)[:90]:90s} {r['size_mb']:5.0f} {r['peak_rss_mb']:5.0f} {r['weights_mb']:7.0f} "
              f"{r['p50_ms']:7.2f} {r['vs_fp32']:6.2f} {r['ttft_ms']:6.1f} "
              f"{a['mean_kl']:9.2e} {a['top1_agreement']:6.3f} {a['perplexity_change_pct']:+7.2f}")


def wait_for_quiet(limit_s: float = 1800, load: float = 0.7) -> None:
    """Time only when nothing else runs: wait (up to `limit_s`) for the 1-minute load average to fall
    below `load`, so a build or test suite beside us does not land in the figures."""
    t = time.time()
    while os.getloadavg()[0] > load and time.time() - t < limit_s:
        time.sleep(10)
    print(f"timing at load average {os.getloadavg()[0]:.2f} (waited {time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
