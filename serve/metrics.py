"""Prometheus metrics: request counts, latency histograms, each scheduler's queue and batch read at
scrape time, and the pauses of Python's garbage collector. One registry per app, so several apps
(tests) never share series."""

from __future__ import annotations

import bisect
import gc
import itertools
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)  # up to the request timeouts
GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class GcPauses:
    """Python's garbage collector pauses every thread (the scheduler's steps too) while it runs: each
    collection's duration by generation, from a gc callback. A collection can start at any allocation,
    inside any lock, so the callback takes no lock and makes no container: it bumps preallocated
    counts, rendered as a histogram at scrape time."""

    def __init__(self):
        self.counts = [[0] * (len(GC_BUCKETS) + 1) for _ in range(3)]  # per generation, per bucket (+Inf last)
        self.sums = [0.0, 0.0, 0.0]
        self.t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.t0 = time.perf_counter()
            return
        d, g = time.perf_counter() - self.t0, info["generation"]
        self.counts[g][bisect.bisect_left(GC_BUCKETS, d)] += 1
        self.sums[g] += d

    def watch(self, on: bool) -> None:
        if on:
            gc.callbacks.append(self)
        elif self in gc.callbacks:
            gc.callbacks.remove(self)

    def collect(self):
        h = HistogramMetricFamily("gpt2onnx_gc_pause_seconds", "Python garbage collections (every thread waits)", labels=["generation"])
        les = [*map(str, GC_BUCKETS), "+Inf"]
        for g in range(3):  # Prometheus buckets are cumulative
            h.add_metric([str(g)], list(zip(les, itertools.accumulate(self.counts[g]))), self.sums[g])
        yield h


class _SchedulerCollector:
    def __init__(self, models):
        self.models = models

    def collect(self):
        gauges = {k: GaugeMetricFamily(f"gpt2onnx_{k}", help_, labels=["model"]) for k, help_ in (
            ("waiting", "requests waiting for a slot"), ("running", "requests in the batch"),
            ("slots", "batch rows (scheduler max_batch)"), ("held_prefixes", "free slots keeping a conversation's cache"))}
        counters = {k: CounterMetricFamily(f"gpt2onnx_{k}", help_, labels=["model"]) for k, help_ in (
            ("prompt_tokens", "prompt tokens admitted"), ("cached_tokens", "prompt tokens reused from held caches"),
            ("generated_tokens", "tokens generated"), ("steps", "decode steps"), ("refused", "requests refused: queue full"),
            ("cancelled", "requests cancelled"), ("errors", "requests failed in the engine"))}
        for m in self.models:
            snap = m.scheduler.metrics()
            for k, g in gauges.items():
                g.add_metric([m.name], snap[k])
            for k, c in counters.items():
                c.add_metric([m.name], snap[k])
        yield from gauges.values()
        yield from counters.values()


class Metrics:
    def __init__(self, models):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gpt2onnx_http_requests", "generation requests accepted", ["route"], registry=r)
        self.errors = Counter("gpt2onnx_http_errors", "error responses (streamed ones by the status they would have had)", ["status"], registry=r)
        # per model, as vLLM's: two models' latencies in one series say nothing of either
        self.ttft = Histogram("gpt2onnx_time_to_first_token_seconds", "submission to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gpt2onnx_inter_token_seconds", "gap between consecutive tokens", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("gpt2onnx_request_seconds", "submission to last token", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        for m in models:  # each model's series from the start, at 0 (a rate over a series that appears later misses its first)
            for h in (self.ttft, self.itl, self.latency):
                h.labels(model=m.name)
        r.register(_SchedulerCollector(models))
        self.gc = GcPauses()  # watched while the app runs (its lifespan)
        r.register(self.gc)
        # the process's memory, CPU time and open files (process_resident_memory_bytes ...), and Python's version:
        # what the default registry would carry, here in the app's own
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def observe(self, model: str, res) -> None:
        """Record one finished choice's timings."""
        ts = res.stats.token_s
        if not ts:
            return
        self.ttft.labels(model=model).observe(ts[0] - res.stats.submitted_s)
        self.latency.labels(model=model).observe(ts[-1] - res.stats.submitted_s)
        itl = self.itl.labels(model=model)
        for a, b in zip(ts, ts[1:]):
            itl.observe(b - a)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
