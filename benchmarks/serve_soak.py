"""Serve many requests and watch the server's memory: does it grow with requests served?

    python -m gpt2onnx.benchmarks.serve_soak ARTIFACT [--requests 10000] [--clients 8] [--every 1000]

Starts `gpt2onnx serve ARTIFACT` on a free loopback port, sends `--requests` short completions
(half streamed, a tenth hung up after the first chunk) from `--clients` closed-loop clients, and
prints the server's resident memory (VmRSS) after every `--every` requests, then the ratio of the
last reading to the first, and the garbage collector's pauses the server counted (its /metrics:
collections per generation, their total, the longest one's bucket). Bounded: it stops after the
requests or `--timeout-s`, whichever first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from .memory import status


def main(argv: list[str] | None = None) -> int:
    import httpx

    from .settings import ToolParser

    p = ToolParser(prog="python -m gpt2onnx.benchmarks.serve_soak", description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--timeout-s", type=float, default=1800)
    a = p.parse_args(argv)
    p.at_least(a, requests=1, clients=1, every=1)
    if not 0 < a.timeout_s < float("inf"):
        p.error(f"--timeout-s must be a positive number of seconds, got {a.timeout_s}")
    try:
        proc, base = start_server(a.artifact, "--max-queue", str(4 * a.clients), env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    url = base + "/completions"
    model = os.path.basename(os.path.normpath(a.artifact))
    lock, done, readings, failures = threading.Lock(), [0], [], []
    deadline = time.time() + a.timeout_s

    def client(ci: int) -> None:
        with httpx.Client(timeout=60) as http:
            while time.time() < deadline:
                with lock:
                    if done[0] >= a.requests:
                        return
                    i = done[0]
                    done[0] += 1
                body = {"model": model, "prompt": f"soak {i}", "max_tokens": 4 + i % 8, "temperature": 0.8, "seed": i}
                try:
                    if i % 2:
                        with http.stream("POST", url, json={**body, "stream": True}) as r:
                            for ln in r.iter_lines():
                                if i % 10 == 1 and ln.startswith("data: {"):
                                    break  # hang up mid-stream
                    else:
                        r = http.post(url, json=body)
                    if r.status_code not in (200, 429):  # 429: the queue is full, a well-formed answer
                        failures.append(r.status_code)
                except Exception as e:  # noqa: BLE001 - every failure is counted, none ends a client unseen
                    failures.append(type(e).__name__)
                if (i + 1) % a.every == 0:
                    readings.append((i + 1, status(proc.pid)["VmRSS"]))

    t = time.time()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    gc_lines = gc_pauses(httpx.get(url.rsplit("/v1/", 1)[0] + "/metrics", timeout=10).text)
    proc.terminate()
    proc.wait(60)
    readings.sort()
    for n, mb in readings:
        print(f"after {n:6d} requests: server RSS {mb:.1f} MB")
    print(f"{done[0]} requests in {time.time() - t:.0f} s, failures {len(failures)} {sorted(set(map(str, failures)))[:5]}")
    if len(readings) >= 2:
        print(f"last / first reading: {readings[-1][1] / readings[0][1]:.3f}")
    print("\n".join(gc_lines))
    if done[0] < a.requests:  # the figures above cover fewer requests than asked: not the soak asked for
        print(f"stopped by --timeout-s after {done[0]} of {a.requests} requests", file=sys.stderr)
    return 0 if not failures and done[0] >= a.requests else 1


def start_server(artifact: str, *flags: str, env: dict | None = None, cwd: str | None = None) -> tuple[subprocess.Popen, str]:
    """`gpt2onnx serve ARTIFACT` (cpu, a free loopback port, and `flags`) as a process, once it answers, and its
    /v1 URL; its stderr is drained in the background. RuntimeError with its output when it does not start."""
    proc = subprocess.Popen([sys.executable, "-m", "gpt2onnx.cli", "serve", artifact, "--port", "0", "--provider", "cpu",
                             *flags], stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    line = proc.stderr.readline()
    if "serving" not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line}{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    return proc, line.split(" on ")[1].split()[0]


def gc_pauses(metrics: str) -> list[str]:
    """One line per generation from the server's gpt2onnx_gc_pause_seconds histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    gens: dict[str, dict] = {}  # generation -> {"count", "sum", "buckets": [(le, cumulative count)]}
    for family in text_string_to_metric_families(metrics):
        if family.name != "gpt2onnx_gc_pause_seconds":
            continue
        for s in family.samples:
            g = gens.setdefault(s.labels["generation"], {"buckets": []})
            if s.name.endswith("_bucket"):
                g["buckets"].append((float(s.labels["le"]), s.value))
            else:
                g[s.name.rsplit("_", 1)[1]] = s.value  # _count, _sum
    out = []
    for gen, g in sorted(gens.items()):
        if not g["count"]:
            out.append(f"gc generation {gen}: no collections")
            continue
        longest = next(le for le, n in sorted(g["buckets"]) if n == g["count"])  # the first bucket holding all (+Inf at worst)
        out.append(f"gc generation {gen}: {g['count']:.0f} collections, {1e3 * g['sum']:.1f} ms in all, longest <= {1e3 * longest:g} ms")
    return out

if __name__ == "__main__":
    sys.exit(main())
