"""The interleaved measurement loop: every system's worker is started once, then each repeat runs each
scenario point on every system in turn (A B C A B C ...), after one untimed warm-up pass (repeat -1)
with short generations. Where `make llamacpp` built llama.cpp's own tools, each timed repeat also runs
llama-bench once per llama.cpp system at the first decode point, so its figure is a median over the
same repeats as everyone else's. A baseline whose process dies, or that answers with an error (a
compile that failed), is dropped with the reason and its figures with it; ours dying ends the run."""

from __future__ import annotations

import subprocess
import time

from gpt2onnx.runtime.errors import Gpt2OnnxError
from gpt2onnx.runtime.session import physical_cores

from . import figures
from .engines import llamacpp
from .plan import Plan, concurrent_runs
from .results import system_entry
from .settings import Settings
from .worker import SystemSpec, Worker, WorkerDied, WorkerError

# Pause before each timed run: the previous system's worker threads (PyTorch's OpenMP, onnxruntime's
# pool) spin for a while after their work, and on a 2-core machine they would slow the next system.
SETTLE_S = 0.3


class Workers:
    """The systems' worker processes, and the baselines dropped on the way (`dead`, `skipped`)."""

    def __init__(self, log):
        self.log = log
        self.running: list[Worker] = []
        self.skipped: list[dict] = []  # {baseline, reason} of each dropped baseline
        self.dead: set[str] = set()
        self.llama_bench: dict[str, list[dict]] = {}  # llama.cpp system -> its llama-bench run of each repeat

    def start(self, spec: SystemSpec) -> Worker | None:
        self.log(f"loading {spec.name}")
        try:
            w = Worker(spec)
        except (WorkerDied, WorkerError) as e:
            self.drop(spec, e, "loading")
            return None
        self.running.append(w)
        return w

    def ask(self, w: Worker, doing: str, kind: str, **args) -> dict | None:
        """The worker's answer, or None when it died or failed (a baseline then is dropped)."""
        try:
            return w.request(kind, **args)
        except (WorkerDied, WorkerError) as e:
            self.drop(w.spec, e, doing)
            return None

    def drop(self, spec: SystemSpec, e: WorkerDied | WorkerError, doing: str) -> None:
        """Drop a baseline with the reason. Raises: ours never is dropped (its error, or Gpt2OnnxError)."""
        if spec.kind == "ours":
            if isinstance(e, WorkerError):
                raise e
            raise Gpt2OnnxError(f"{spec.name}: {e} while {doing}") from None
        self.log(f"dropping the {spec.name} baseline: {e} while {doing}")
        self.skipped.append({"baseline": spec.name, "reason": f"{e} while {doing}"})
        self.dead.add(spec.name)

    def alive(self, batch: int = 1) -> list[Worker]:
        """Workers still running that decode `batch` rows (llama.cpp's binding: batch 1 only)."""
        return [w for w in self.running if w.spec.name not in self.dead and batch <= w.loaded.get("max_batch", batch)]

    def close(self) -> None:
        for w in self.running:
            w.close()


def measure(s: Settings, plan: Plan, specs: list[SystemSpec], manifests, log) -> tuple[list[dict], list[dict], Workers]:
    """Run the plan on every system: (systems, records, workers). A system's entry is made from its
    worker's load report and gets the worker's memory at the end; `workers.dead` and `workers.skipped`
    name the baselines dropped on the way (their entries and records are still in the lists)."""
    pool = Workers(log)
    systems, records = [], []
    try:
        for spec in specs:
            w = pool.start(spec)
            if w is not None:
                systems.append(system_entry(spec, w.loaded, manifests))
        cpp = [w.spec for w in pool.running if w.spec.kind == "llamacpp"]
        why = llamacpp.tools_missing() if cpp else None
        if why:
            log(f"llama.cpp through its binding only: {why}")
            cpp = []
        conc_runs = concurrent_runs(s, pool.running) if plan.concurrent else []
        conc_clients = plan.concurrent["clients"] if conc_runs else []
        conc_repeats = s.concurrent_repeats if conc_runs else 0
        total = (sum(len(pool.alive(p[1])) for p in plan.points) + bool(plan.chat_turns) * len(pool.running)) * (s.repeats + 1)
        total += len(conc_clients) * len(conc_runs) * (conc_repeats + 1) + len(cpp) * s.repeats
        from rich.progress import Progress

        with Progress(transient=False) as bar:
            progress = _Progress(bar, bar.add_task("measuring", total=total))
            repeats = max(s.repeats, conc_repeats)
            for rep in range(-1, repeats):  # -1 = warm-up, not recorded
                if not bar.console.is_terminal:  # no live bar in a log file: a line per pass instead
                    log("warm-up" if rep < 0 else f"repeat {rep + 1}/{repeats}")
                if rep < s.repeats:
                    records += _generate_points(pool, plan.points, rep, s.repeats, progress)
                    if rep >= 0:
                        _llama_bench(pool, s, plan.points, cpp, rep, progress)
                    if plan.chat_turns:
                        records += _chat(pool, s, plan.chat_turns, rep, progress)
                if rep < conc_repeats:
                    for clients in conc_clients:
                        records += _concurrent(pool, s, plan.concurrent, conc_runs, clients, rep, conc_repeats, progress)
        for w, sysrec in zip(pool.running, systems):
            if w.spec.name not in pool.dead:
                sysrec.update(pool.ask(w, "reporting its memory", "memory") or {})
    finally:
        pool.close()
    return systems, records, pool


class _Progress:
    def __init__(self, bar, task):
        self.bar, self.task = bar, task

    def show(self, rep: int, repeats: int, what: str) -> None:
        self.bar.update(self.task, description=f"{'warm-up' if rep < 0 else f'repeat {rep + 1}/{repeats}'} {what}")

    def advance(self) -> None:
        self.bar.advance(self.task)


def _generate_points(pool: Workers, points, rep: int, repeats: int, progress: _Progress) -> list[dict]:
    """One pass of the decode, throughput and context points over every system that fits each."""
    out = []
    for scenario, batch, plen, new in points:
        for w in pool.alive(batch):
            progress.show(rep, repeats, f"{scenario} b{batch} p{plen} {w.spec.name}")
            time.sleep(SETTLE_S)
            n = new if rep >= 0 else min(new, 4)
            r = pool.ask(w, f"{scenario} b{batch} p{plen}", "generate", batch=batch, prompt_len=plen, new_tokens=n)
            if r is None:
                continue
            if len(r["tokens"]) != batch or any(len(t) != n for t in r["tokens"]):  # a bug, not a figure
                raise Gpt2OnnxError(f"{w.spec.name}: asked for {batch} rows of {n} tokens, got {[len(t) for t in r['tokens']]}")
            if rep >= 0:
                out.append(figures.record(w.spec.name, scenario, rep, batch, plen, new, r))
            progress.advance()
    return out


def _llama_bench(pool: Workers, s: Settings, points, specs: list[SystemSpec], rep: int, progress: _Progress) -> None:
    """One llama-bench run (its own warm-up, then once each) per llama.cpp system at every batch-1 point
    the binding runs: the prompt of each decode point and the decode after each decode and context
    point's prompt; and one llama-batched-bench run at the throughput points' batches, which the
    binding cannot run. A system whose run fails gets none after it, saying why."""
    prompts = [p for sc, b, p, _ in points if sc == "decode" and b == 1]
    decode = list(dict.fromkeys((p, n) for sc, b, p, n in points if sc in ("decode", "context") and b == 1))
    batched = [(b, p, n) for sc, b, p, n in points if sc == "throughput"]  # one prompt length and count of new tokens
    for spec in specs:
        progress.show(rep, s.repeats, f"llama-bench {spec.name}")
        runs = pool.llama_bench.setdefault(spec.name, [])
        if spec.name not in pool.dead and len(runs) == rep and prompts:  # a failed run stops this system's
            time.sleep(SETTLE_S)
            try:
                threads = s.threads or physical_cores()
                run = llamacpp.llama_bench(spec.path, threads, prompts, decode, 1)
                if batched:
                    run["batched"] = llamacpp.batched_bench(spec.path, threads, batched[0][1], batched[0][2], [b for b, _, _ in batched])
                runs.append(run)
            except (Gpt2OnnxError, subprocess.TimeoutExpired) as e:
                pool.log(f"no llama-bench figures for {spec.name} from repeat {rep + 1}: {e}")
        progress.advance()


def _chat(pool: Workers, s: Settings, turns: int, rep: int, progress: _Progress) -> list[dict]:
    """One pass of the chat scenario (a one-turn conversation in the warm-up): a record per turn."""
    out = []
    for w in pool.alive():
        progress.show(rep, s.repeats, f"chat {w.spec.name}")
        time.sleep(SETTLE_S)
        r = pool.ask(w, "chat", "chat", turns=turns if rep >= 0 else 1, user_len=s.chat_user_len, reply_len=s.chat_reply_len)
        if r is not None and rep >= 0:
            out += [figures.record(w.spec.name, "chat", rep, 1, t["prompt_len"], s.chat_reply_len, t) for t in r["turns"]]
        progress.advance()
    return out


def _concurrent(pool: Workers, s: Settings, mix: dict, runs, clients: int, rep: int, repeats: int,
                progress: _Progress) -> list[dict]:
    """One pass of the concurrent scenario at `clients` clients over every (worker, mode) of `runs`."""
    out = []
    n = mix["requests"][clients]
    for w, mode in [(w, m) for w, m in runs if w.spec.name not in pool.dead]:
        progress.show(rep, repeats, f"concurrent c{clients} {w.spec.name} {mode}")
        time.sleep(SETTLE_S)
        max_batch = min(clients, s.concurrent_max_batch)
        # the warm-up: one request per client, 2 tokens each (every batch shape, little time)
        r = pool.ask(w, f"concurrent c{clients}", "concurrent", mode=mode, clients=clients, requests=n if rep >= 0 else min(n, clients),
                     prompt_len=mix["prompt_len"], reply_len=mix["reply_len"], reply_cap=0 if rep >= 0 else 2, max_batch=max_batch)
        if r is not None and rep >= 0:
            out.append(figures.concurrent_record(w.spec.name, mode, rep, clients, max_batch, r["requests"]))
        progress.advance()
    return out
