"""Before / after: the runtime of another checkout against this one, on the same machine, interleaved.

    python -m gpt2onnx.benchmarks.ab /path/to/base-checkout --base-art A_FP32 A_INT8 ... --new-art B_FP32 B_INT8 ...

The harness measures systems, not two versions of ours; this measures what a runtime change must not
slow: batch-1 decode (prompt 32, 64 new tokens, p50 ms/token), static batch 16 (prompt 32, 64 new,
tokens/s end to end and TTFT) and the Scheduler under 16 closed-loop clients (64 requests, prompts
16-256, replies 16-128 tokens, tokens/s). Every sample is a fresh process importing one checkout's
gpt2onnx (a package tree of symlinks put first on its path), the two sides alternate and swap order
every repeat, and the medians and new/base ratios are printed. Each side reads its own artifacts
(export them with each checkout when the graph changed). Only the public runtime API is used, so
any two versions that have it compare. `--base-load` / `--new-load` pass Engine.load options to one
side (JSON, e.g. '{"huge_pages": false}': the same checkout and artifacts on both sides then compare
one load option). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

MODES = ("b1", "b16", "c16")


def sample(mode: str, art: str, load: dict | None = None) -> dict:
    """One measurement in this process (whatever gpt2onnx resolves to); `load`: more Engine.load options."""
    import numpy as np

    from gpt2onnx.runtime import Engine, Scheduler, SchedulerConfig

    e = Engine.load(art, **{"provider": "cpu", "threads": 2, **(load or {})})
    rng = np.random.default_rng(0)
    if mode == "b1":
        p = rng.integers(0, e.vocab_size - 1, 32).tolist()
        e.generate([p], max_new_tokens=16, eos_token_id=-1)  # warm-up
        vals = []
        for _ in range(3):
            e.generate([p], max_new_tokens=64, eos_token_id=-1)
            vals.append(e.stats.per_token_p50_ms)
        return {"ms_per_token": statistics.median(vals), "ttft_ms": 1e3 * e.stats.ttft_s}
    if mode == "b16":
        ps = [rng.integers(0, e.vocab_size - 1, 32).tolist() for _ in range(16)]
        e.generate(ps, max_new_tokens=8, eos_token_id=-1)
        vals, ttft = [], []
        for _ in range(2):
            t = time.perf_counter()
            e.generate(ps, max_new_tokens=64, eos_token_id=-1)
            vals.append(16 * 64 / (time.perf_counter() - t))
            ttft.append(1e3 * e.stats.ttft_s)
        return {"tok_s": statistics.median(vals), "ttft_ms": statistics.median(ttft)}
    work = [(rng.integers(0, e.vocab_size - 1, int(rng.integers(16, 257))).tolist(), int(rng.integers(16, 129)))
            for _ in range(64)]
    with Scheduler(e, SchedulerConfig(max_batch=16)) as s:
        s.submit(work[0][0], max_new_tokens=4, eos_token_id=-1).result()
        jobs, lock, done = iter(work), threading.Lock(), [0]

        def client() -> None:
            while True:
                with lock:
                    job = next(jobs, None)
                if job is None:
                    return
                r = s.submit(job[0], max_new_tokens=job[1], eos_token_id=-1).result(timeout=600)
                with lock:
                    done[0] += len(r.tokens)

        t = time.perf_counter()
        clients = [threading.Thread(target=client) for _ in range(16)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        return {"tok_s": done[0] / (time.perf_counter() - t)}


PARTS = ("gpt2onnx/__init__.py", "gpt2onnx/cli.py", "runtime", "export", "serve", "benchmarks")  # what shim links


def shim(checkout: str, root: str) -> str:
    """A directory holding a `gpt2onnx` package made of links into `checkout` (its package-dir mapping)."""
    pkg = os.path.join(root, "gpt2onnx")
    os.makedirs(pkg)
    for part in PARTS:
        os.symlink(os.path.join(checkout, part), os.path.join(pkg, os.path.basename(part)))
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", help="the other checkout (its root directory)")
    p.add_argument("--base-art", nargs="+", required=True, help="artifacts for the base side, one per precision")
    p.add_argument("--new-art", nargs="+", required=True, help="the same precisions, for this checkout")
    p.add_argument("--modes", default="b1,b16,c16", help="which scenarios (b1 runs every artifact, b16 and c16 the first two / the int8 one)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--base-load", default="{}", help="Engine.load options of the base side, as JSON")
    p.add_argument("--new-load", default="{}", help="Engine.load options of this checkout's side, as JSON")
    p.add_argument("--sample", nargs=3, metavar=("MODE", "ART", "LOAD"), help=argparse.SUPPRESS)  # a child process
    args = p.parse_args()
    if args.sample:
        import gpt2onnx.runtime

        # where the package came from: the parent checks it is the side's checkout, not an installed copy
        origin = os.path.realpath(gpt2onnx.runtime.__file__)
        print(json.dumps({"origin": origin, "figures": sample(args.sample[0], args.sample[1], json.loads(args.sample[2]))}))
        return
    base = os.path.abspath(args.base)
    missing = [part for part in PARTS if not os.path.exists(os.path.join(base, part))]
    if missing:
        p.error(f"{args.base} is not a gpt2onnx checkout (no {missing[0]}); pass the root of the other checkout")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes takes a comma-separated choice of {', '.join(MODES)}, got {args.modes!r}")
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if len(args.base_art) != len(args.new_art):
        p.error(f"--base-art and --new-art pair artifacts one by one: give as many of each ({len(args.base_art)} and {len(args.new_art)})")
    arts = [os.path.abspath(a) for a in args.base_art + args.new_art]  # the children run in a temporary directory
    for a in arts:
        if not os.path.isfile(os.path.join(a, "gpt2onnx.json")):
            p.error(f"{a} is not an artifact directory (no gpt2onnx.json)")
    loads = {}
    for side in ("base", "new"):
        try:
            loads[side] = json.loads(getattr(args, f"{side}_load"))
        except ValueError:
            loads[side] = None
        if not isinstance(loads[side], dict):  # a check, not an assert: python -O would drop that
            p.error(f"--{side}-load takes a JSON object of Engine.load options, e.g. '{{\"huge_pages\": false}}'")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pairs = list(zip(arts[: len(args.base_art)], arts[len(args.base_art):]))
    roots = {"base": os.path.realpath(base), "new": os.path.realpath(here)}
    jobs = [(m, i) for m in modes for i in (range(len(pairs)) if m == "b1" else [1 if m == "c16" and len(pairs) > 1 else 0])]
    results: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"base": shim(base, os.path.join(tmp, "base")), "new": shim(here, os.path.join(tmp, "new"))}
        for rep in range(args.repeats):
            for mode, i in jobs:
                for side in (("base", "new") if rep % 2 == 0 else ("new", "base")):
                    art = pairs[i][0 if side == "base" else 1]
                    env = {**os.environ, "PYTHONPATH": paths[side]}
                    # this file as the child, whatever the side's version of it: only gpt2onnx comes from the side
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "-", "--base-art", "-", "--new-art", "-",
                                          "--sample", mode, art, json.dumps(loads[side])],
                                         env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
                    if out.returncode:
                        sys.exit(f"{side} {mode} {art} failed: {out.stderr.strip().splitlines()[-1:]}")
                    child = json.loads(out.stdout)
                    if not child["origin"].startswith(roots[side] + os.sep):  # an A/B of one checkout against itself
                        sys.exit(f"the {side} side ran gpt2onnx from {child['origin']}, not from {roots[side]}; "
                                 "another gpt2onnx on the import path (an installed copy, PYTHONPATH) came first")
                    results.setdefault((mode, os.path.basename(pairs[i][1]), side), []).append(child["figures"])
    for (mode, name, side) in sorted(k for k in results if k[2] == "new"):
        for metric in results[(mode, name, side)][0]:
            bs = [r[metric] for r in results[(mode, name, "base")]]
            ns = [r[metric] for r in results[(mode, name, "new")]]
            b, n = statistics.median(bs), statistics.median(ns)
            spread = f"base {min(bs):.2f}-{max(bs):.2f}, new {min(ns):.2f}-{max(ns):.2f}"  # the noise a ratio sits in
            print(f"{mode:4} {name:28} {metric:13} base {b:9.2f}  new {n:9.2f}  new/base {n / b:.3f}  ({spread})")


if __name__ == "__main__":
    main()
