"""How long one client's stream stalls while the server answers another client's large response.

    python -m gpt2onnx.benchmarks.serve_stall ARTIFACT [--prompts 16] [--prompt-len 1000] [--logprobs 5]
                                              [--repeats 3] [--base OTHER_CHECKOUT]

Starts `gpt2onnx serve ARTIFACT` on a free loopback port. One client streams greedy completions, one
after another; two seconds in, another sends `--prompts` random-token prompts of `--prompt-len` tokens to be echoed
and scored (max_tokens 0, echo, logprobs: what lm-evaluation-harness sends for log-likelihoods), a
response sent whole. Printed per run: the largest gap between two chunks of a stream while that request
was open, how long before its answer that gap ended (0: the stall was the answer itself being built),
the stream's median gap before it, and the scoring request's time and size. With `--base`, servers
from that checkout (a package tree of links, as benchmarks/ab.py builds) and from this one alternate
run by run and the medians of both are printed. Bounded: the streams stop once the scoring request is answered, and
every call has a timeout. Run it on a quiet machine.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time

from .ab import PARTS, shim
from .serve_soak import start_server


def run_once(artifact: str, env: dict, cwd: str, prompts: int, prompt_len: int, logprobs: int, stream_tokens: int) -> dict:
    """One server (run in `cwd`, with `env`: its PYTHONPATH names the checkout), a stream, a scoring request;
    the figures of that run."""
    import httpx

    proc, base = start_server(artifact, "--max-body-bytes", str(16 << 20), env=env, cwd=cwd)
    try:
        model = os.path.basename(os.path.normpath(artifact))
        rng = random.Random(0)
        body = {"model": model, "prompt": [[rng.randrange(50000) for _ in range(prompt_len)] for _ in range(prompts)],
                "max_tokens": 0, "echo": True, "logprobs": logprobs}
        gaps: list[tuple[float, float]] = []  # (gap, when it ended) between consecutive chunks of one stream
        stop = threading.Event()

        def stream() -> None:  # one stream after another until stopped (a short context ends each soon)
            s = {"model": model, "prompt": "Hello", "max_tokens": stream_tokens, "temperature": 0, "ignore_eos": True,
                 "stream": True}
            with httpx.Client(timeout=120) as c:
                while not stop.is_set():
                    last = None
                    with c.stream("POST", base + "/completions", json=s) as r:
                        for ln in r.iter_lines():
                            if ln.startswith("data: {"):
                                now = time.perf_counter()
                                if last is not None:
                                    gaps.append((now - last, now))
                                last = now
                            if stop.is_set():
                                return

        reader = threading.Thread(target=stream)
        reader.start()
        time.sleep(2)
        t0 = time.perf_counter()
        r = httpx.post(base + "/completions", content=json.dumps(body).encode(), timeout=600,
                       headers={"content-type": "application/json"})
        t1 = time.perf_counter()
        time.sleep(0.5)
        stop.set()
        reader.join(150)
        if r.status_code != 200:
            raise RuntimeError(f"the scoring request got {r.status_code}: {r.text[:200]}")
        during = [g for g in gaps if t0 <= g[1] <= t1 + 0.5]
        before = [g for g, at in gaps if at < t0]
        if not during or not before:
            raise RuntimeError("the stream sent no chunks around the scoring request")
        worst = max(during)
        return {"stall_ms": 1e3 * worst[0], "stall_ended_before_answer_s": t1 - worst[1],
                "gap_p50_before_ms": 1e3 * statistics.median(before), "score_s": t1 - t0, "response_mb": len(r.content) / 1e6}
    finally:
        proc.terminate()
        proc.wait(60)


def main(argv: list[str] | None = None) -> int:
    from .settings import ToolParser

    p = ToolParser(prog="python -m gpt2onnx.benchmarks.serve_stall", description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--logprobs", type=int, default=5)
    p.add_argument("--stream-tokens", type=int, default=500, help="each streamed completion's length (within the context)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--base", help="another checkout whose server alternates with this one's")
    a = p.parse_args(argv)
    p.at_least(a, prompts=1, prompt_len=1, repeats=1, stream_tokens=1)
    if not os.path.isfile(os.path.join(a.artifact, "gpt2onnx.json")):
        p.error(f"{a.artifact} is not an artifact directory (no gpt2onnx.json)")
    if a.base and not all(os.path.exists(os.path.join(a.base, part)) for part in PARTS):
        p.error(f"{a.base} is not a gpt2onnx checkout; pass the root of the other checkout")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"new": {**os.environ, "PYTHONPATH": shim(here, os.path.join(tmp, "new"))}}
        if a.base:
            sides["base"] = {**os.environ, "PYTHONPATH": shim(os.path.abspath(a.base), os.path.join(tmp, "base"))}
        for rep in range(a.repeats):
            for side in (sorted(sides) if rep % 2 == 0 else sorted(sides, reverse=True)):
                try:
                    fig = run_once(os.path.abspath(a.artifact), sides[side], tmp, a.prompts, a.prompt_len, a.logprobs, a.stream_tokens)
                except RuntimeError as e:
                    print(f"{side}: {e}", file=sys.stderr)
                    return 1
                results.setdefault(side, []).append(fig)
                print(f"{side:4} run {rep + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in fig.items()), flush=True)
    for side, figs in sorted(results.items()):
        print(f"{side:4} median: " + ", ".join(f"{k} {statistics.median(f[k] for f in figs):.2f}" for k in figs[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
