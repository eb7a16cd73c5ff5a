"""Build, serve and shut down the HTTP app again and again in one process: does it free what it held?

    python -m gpt2onnx.benchmarks.app_rounds ARTIFACT [--rounds 6] [--requests 4]

Each round loads the artifact (engine and scheduler), builds the app, serves it with uvicorn on a
free loopback port, sends `--requests` short completions, and shuts it down the way SIGTERM does;
then drops every reference, collects garbage and prints the process's resident memory (VmRSS) and
how many of the rounds' schedulers are still alive. What a process pays that rebuilds its app
(tests, the benchmark harness, a Ray replica that restarts, a service that reloads its model).
"""

from __future__ import annotations

import gc
import json
import sys
import weakref

from .memory import status


def one_round(artifact: str, requests: int) -> weakref.ref:
    """One build / serve / shut-down round; returns a weak reference to its scheduler."""
    import httpx

    from gpt2onnx.serve.app import build_app
    from gpt2onnx.serve.config import ServeConfig
    from gpt2onnx.serve.server import load_models

    from .clients import served

    cfg = ServeConfig()
    models = load_models([artifact], cfg)
    ref = weakref.ref(models[0].scheduler)
    with served(build_app(models, cfg)) as base, httpx.Client(timeout=120) as http:  # leaving: the app's shutdown closes the schedulers
        for i in range(requests):
            body = {"model": models[0].name, "prompt": f"round {i}", "max_tokens": 8, "temperature": 0, "stream": bool(i % 2)}
            r = http.post(base + "/v1/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    return ref


def rounds(artifact: str, n: int, requests: int, log=print) -> dict:
    """`n` rounds; returns {"rss_mb": [after each round], "alive": schedulers still referenced at the end}."""
    refs, rss = [], []
    for i in range(n):
        refs.append(one_round(artifact, requests))
        gc.collect()
        rss.append(status()["VmRSS"])
        log(f"round {i + 1}: RSS {rss[-1]:.1f} MB, schedulers alive {sum(r() is not None for r in refs)}")
    return {"rss_mb": rss, "alive": sum(r() is not None for r in refs)}


def main(argv: list[str] | None = None) -> int:
    from .settings import ToolParser

    p = ToolParser(prog="python -m gpt2onnx.benchmarks.app_rounds", description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    a = p.parse_args(argv)
    p.at_least(a, rounds=1, requests=1)
    out = p.run(rounds, a.artifact, a.rounds, a.requests, log=lambda m: print(m, file=sys.stderr, flush=True))
    growth = out["rss_mb"][-1] / out["rss_mb"][0]
    print(f"RSS {out['rss_mb'][0]:.1f} -> {out['rss_mb'][-1]:.1f} MB (x{growth:.3f}) over {a.rounds} rounds; "
          f"{out['alive']} of {a.rounds} schedulers still alive", file=sys.stderr)
    if a.json:
        print(json.dumps({**out, "growth": growth}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
