"""The GPU check's pieces, on the CPU: the static-cache PyTorch baseline (pytorch-compile, uncompiled
off CUDA), the capture check (benchmarks/gpu_check.py) on the cpu provider, the bandwidth the floor
divides by, the GPU bars' text, and the invocations benchmarks/gpu.sh makes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2onnx.benchmarks import (
    figures,
    gpu_check,
    gpu_kernels,
    gpu_step,
    harness,
    loop,
    report,
    settings,
    worker,
    workloads,
)
from gpt2onnx.benchmarks.engines.pytorch import PyTorch, PyTorchCompiled
from gpt2onnx.benchmarks.machine import device_bandwidth_gbs, machine_info
from gpt2onnx.export import checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, tiny):
    """synthetic:tiny as a Hugging Face directory, as the harness saves it for its baselines."""
    path = str(tmp_path_factory.mktemp("hf") / "hf-tiny-seed0")
    checkpoints.save_hf_checkpoint(tiny, path)
    return path


# ---- the static-cache baseline ------------------------------------------------------------------

def test_static_cache_baseline_follows_eager_pytorch(tiny_hf):
    """pytorch-compile's path off CUDA: generate through a kept StaticCache per batch size, reset between
    calls. Its greedy tokens equal eager PyTorch's, also when a cache is reused by a later call of the
    same batch size (a cache not reset would leak the earlier call's keys into the next)."""
    spec = worker.SystemSpec("static", "pytorch-compile", tiny_hf, threads=1)
    static = PyTorchCompiled(spec, 1)
    eager = PyTorch(worker.SystemSpec("eager", "pytorch", tiny_hf, threads=1), 1)
    assert static.info()["compiled"] is False  # compiled on CUDA only
    calls = [(2, 8, 12), (1, 16, 10), (2, 30, 12), (1, 100, 20)]  # each batch size twice: the second reuses its cache
    for batch, plen, new in calls:
        rows = workloads.prompt_rows(batch, plen, static.vocab)
        got, want = static.generate(rows, new), eager.generate(rows, new)
        assert [len(t) for t in got["tokens"]] == [new] * batch and len(got["step_s"]) == new - 1
        assert got["tokens"] == want["tokens"], (batch, plen)
    assert len(set(want["tokens"][0])) > 3  # varied tokens, not one repeated
    assert sorted(static.caches) == [1, 2]
    cache = static.caches[1]
    assert type(cache).__name__ == "StaticCache" and cache.max_cache_len == 128  # the whole position table
    assert tuple(cache.layers[0].keys.shape) == (1, 4, 128, 16)  # [batch, heads, positions, head_dim], allocated once
    assert cache.get_seq_length() == 100 + 20 - 1  # the last call ran through it (its last token is never fed back)


def test_bench_runs_the_static_cache_baseline(tmp_path, tiny_artifact):
    """`--baselines pytorch,pytorch-compile` through the harness: a row and a ratio column each, named
    for what runs (pytorch-static off CUDA), and the report says how it runs."""
    s = settings.Settings(artifacts=[tiny_artifact], baselines=["pytorch", "pytorch-compile"], batch=[1], prompt_len=[8],
                         new_tokens=4, repeats=1, context=[], chat_turns=0, concurrent_clients=[], footprint=False, beams=0,
                         out=str(tmp_path / "rep"), cache=str(tmp_path / "cache"))
    res = harness.run(s, log=lambda m: None)
    by_kind = {x["kind"]: x for x in res["systems"]}
    assert by_kind["pytorch-compile"]["name"] == "pytorch-static fp32 cpu" and by_kind["pytorch-compile"]["compiled"] is False
    assert by_kind["ours"]["cuda_graph"] is False  # the cpu provider: no session with enable_cuda_graph
    assert by_kind["ours"]["device_pick"] is False  # nor greedy's pick on the device (on with cuda by default)
    assert {r["system"] for r in res["records"]} == {"ours fp32 cpu", "pytorch fp32 cpu", "pytorch-static fp32 cpu"}
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| pytorch-static fp32 cpu |" in text and "× pytorch-static fp32 cpu |" in text
    assert "pytorch-static fp32 cpu: transformers `generate` with a static KV cache" in text and "not compiled here" in text
    assert "GB/s (% of read bw)" in text and "## The GPU bars" not in text  # a CPU run: the host's bandwidth, no GPU bars

    # the same results as a CUDA run that measured its GPU's bandwidth: the floor and GB/s use that figure
    res["settings"]["provider"] = "cuda"
    res["machine"]["memory_bandwidth_gbs"]["device_copy"] = 4000.0
    res["summary"] = figures.summarize(res["records"], res["systems"], res["machine"], "cuda")
    ours = next(r for r in res["summary"] if r["system"] == "ours fp32 cpu" and r["scenario"] == "decode")
    assert ours["bandwidth_fraction"] == pytest.approx(ours["achieved_gbs"] / 4000.0)
    report.write_report(res, str(tmp_path / "rep"))
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "GPU device-to-device copy 4000 GB/s" in text and "GB/s (% of GPU bw)" in text and "% of read bw" not in text
    assert "## The GPU bars" in text  # ours is fp32 here: no bar rows, the section states the setting only


def test_bench_drops_a_baseline_that_answers_with_an_error(tmp_path, tiny_artifact, monkeypatch):
    """A baseline whose generate raises (a torch.compile that fails on the GPU machine) is dropped with
    the reason, as a crashed one is; the run and ours' figures go on. Ours answering with an error ends the run."""

    class Failing(worker.Worker):
        def request(self, kind, **args):
            if self.spec.kind == "pytorch-compile" and kind == "generate":
                raise worker.WorkerError(f"{self.spec.name}: BackendCompilerFailed: no C compiler")
            return super().request(kind, **args)

    monkeypatch.setattr(loop, "Worker", Failing)
    s = settings.Settings(artifacts=[tiny_artifact], baselines=["pytorch-compile"], batch=[1], prompt_len=[8], new_tokens=3,
                         repeats=1, context=[], chat_turns=0, concurrent_clients=[], footprint=False, beams=0,
                         out=str(tmp_path / "rep"), cache=str(tmp_path / "cache"))
    res = harness.run(s, log=lambda m: None)
    assert [x["name"] for x in res["systems"]] == ["ours fp32 cpu"] and {r["system"] for r in res["records"]} == {"ours fp32 cpu"}
    assert res["skipped"] == [{"baseline": "pytorch-static fp32 cpu",
                               "reason": "pytorch-static fp32 cpu: BackendCompilerFailed: no C compiler while decode b1 p8"}]
    monkeypatch.setattr(Failing, "request", lambda self, kind, **a: (_ for _ in ()).throw(worker.WorkerError("ours: boom")))
    s.baselines, s.out = [], str(tmp_path / "rep2")
    with pytest.raises(worker.WorkerError, match="^ours: boom$"):
        harness.run(s, log=lambda m: None)


# ---- the bandwidth the floor divides by ---------------------------------------------------------

def test_floor_bandwidth_is_the_gpus_on_cuda():
    machine = {"memory_bandwidth_gbs": {"read": 50.0, "copy": 20.0, "device_copy": 3000.0}}
    assert report.floor_bandwidth(machine, "cuda") == ("device_copy", 3000.0)
    assert report.floor_bandwidth(machine, "cpu") == ("read", 50.0)
    no_gpu_figure = {"memory_bandwidth_gbs": {"read": 50.0, "copy": 20.0}}
    assert report.floor_bandwidth(no_gpu_figure, "cuda") == ("read", 50.0)
    # summarize: achieved GB/s = weights per token / p50, as a fraction of the chosen bandwidth
    rec = {"system": "a", "scenario": "decode", "batch": 1, "prompt_len": 32, "new_tokens": 8,
           **{f: 1.0 for f in figures.FIGURES}}  # p50 1 ms
    systems_ = [{"name": "a", "weights_bytes_per_token": 708e6}]
    for provider, bw in (("cuda", 3000.0), ("cpu", 50.0)):
        row = figures.summarize([rec], systems_, machine, provider)[0]
        assert row["achieved_gbs"] == pytest.approx(708.0) and row["bandwidth_fraction"] == pytest.approx(708.0 / bw)


def test_device_bandwidth_measures_a_copy():
    """The GPU bandwidth measurement, run on the CPU device: a positive figure, no CUDA needed."""
    gbs = device_bandwidth_gbs("cpu", mb=8, repeats=3)
    assert 0.1 < gbs < 10_000


def test_machine_info_on_cuda_measures_the_gpu_or_says_why_not():
    """The bench on CUDA measures the GPU's bandwidth in a process of its own; where torch has no CUDA
    (this machine) the reason is recorded, and the report then names the host bandwidth it used instead."""
    import torch

    machine = machine_info("cuda")
    if torch.cuda.is_available():
        assert machine["memory_bandwidth_gbs"]["device_copy"] > 100 and "device_bandwidth_error" not in machine
    else:
        assert "device_copy" not in machine["memory_bandwidth_gbs"] and "CUDA" in machine["device_bandwidth_error"]
        assert report.floor_bandwidth(machine, "cuda") == ("read", machine["memory_bandwidth_gbs"]["read"])


# ---- the capture check --------------------------------------------------------------------------

def test_capture_check_on_the_cpu_provider(tmp_path, tiny_artifact):
    out = tmp_path / "gpu"
    r = subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.gpu_check", tiny_artifact, "--out", str(out), "--provider",
                        "cpu", "--new-tokens", "6", "--timing-tokens", "6", "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "capture.json").read_text())
    cap, unc = res["runs"]["captured"], res["runs"]["uncaptured"]
    assert (cap["cuda_graph_requested"], unc["cuda_graph_requested"]) == (True, False)
    assert (cap["session_cuda_graph"], unc["session_cuda_graph"]) == (False, False)  # no CUDA graphs on the cpu provider
    assert res["provider"] == "CPUExecutionProvider" and res["captured"] is False
    assert res["tokens_equal"] is True and res["divergence"] == []
    assert res["calls"] == ["batch 1, prompt 8", "batch 1, prompt 32", "batch 1, prompt 100", "batch 4, prompt 8",
                            "batch 3, prompts 8/32/100"]  # 300 + 6 > 128
    # fp32 on the CPU: the right-padded batch's rows give exactly the tokens they give alone
    assert res["padded_batch"] == {"call": "batch 3, prompts 8/32/100", "rows": 3, "equal_alone": 3, "divergence": []}
    assert cap["p50_ms"] > 0 and unc["p50_ms"] > 0 and res["speedup"] == pytest.approx(unc["p50_ms"] / cap["p50_ms"])
    md = (out / "capture.md").read_text()
    assert "Capture: **not captured**: the CPUExecutionProvider has no CUDA graphs." in md
    assert "| captured | yes | no |" in md and "| uncaptured | no | no |" in md
    assert "one right-padded batch (batch 3, prompts 8/32/100, captured engine): 3 of 3 rows" in md
    # the scheduler's fixed-width chunks: the two longer prompts went in as chunks, and every row equals its tokens alone
    sc = res["scheduler_chunks"]
    assert (sc["prompt_width"], sc["rows"], sc["equal_alone"], sc["divergence"]) == (64, 3, 3, [])
    assert len(sc["chunk_passes"]) == 2 and all(w == 64 for _, w in sc["chunk_passes"])
    assert "prompt_width 64 (queued at once, the shortest first" in md and "chunk passes bound for 2 slots): 3 of 3 rows" in md
    assert sc["mixed_passes"] == []  # the artifact has no mixed.onnx (and on the CPU the engine would not take it)
    res["scheduler_chunks"]["mixed_passes"] = [[1, 2, 64]]
    assert "bound for 2 slots, chunks inside a decode step's pass (mixed.onnx) bound for 1 bucket and slot pairs): 3 of 3" \
        in "\n".join(gpu_check.render(res))
    assert md.strip().endswith(r.stdout.strip().splitlines()[-1])  # stdout prints the same summary


def test_step_breakdown_on_the_cpu_provider(tmp_path, tiny_artifact):
    """gpu_step takes a step apart and runs greedy's pick on the device (the artifact's pick.onnx) at
    every batch; on the cpu provider nothing is captured and no device copy happens, but every part is
    timed and the pick's ids equal the host's argmax of the same step at every step (a pick wired to
    the wrong rows or buffer would pick other ids)."""
    out = tmp_path / "step"
    r = subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.gpu_step", tiny_artifact, "--out", str(out), "--provider",
                        "cpu", "--batch", "1,3", "--steps", "5"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "step.json").read_text())
    assert res["provider"] == "CPUExecutionProvider" and res["session_cuda_graph"] is False
    assert [(p["batch"], p["bucket"], p["steps"]) for p in res["parts"]] == [(1, 1, 5), (3, 3, 5)]  # no buckets without capture
    for p in res["parts"]:
        assert p["step_ms"] > 0 and p["run_ms"] > 0 and p["argmax_ms"] > 0
        assert p["inputs_ms"] == 0 and p["logits_ms"] == 0  # the CPU binding points at the host arrays: nothing copied
    assert res["pick"] is True and res["pick_from"] == 4
    for p in res["parts"]:
        assert p["pick_equal"] == "8/8 steps" and p["device_ms"] > 0 and p["pick_ms"] > 0
    assert all(p["prompt_ms"] > 0 and p["chunk_ms"] > 0 for p in res["parts"])
    md = (out / "step.md").read_text()
    assert "| 3 | 3 | 5 |" in md and "the runtime takes it from 4 rows up" in md
    assert sum(1 for line in md.splitlines() if line.endswith("| 8/8 steps |")) == 2


def test_step_breakdown_times_the_mixed_step(tmp_path, tiny_mixed_artifact):
    """Where the artifact has mixed.onnx, gpu_step also times a greedy step with a 64-column chunk inside its
    pass (each batch on one more row), and the table shows it; without it the column says -."""
    out = tmp_path / "step"
    r = subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.gpu_step", tiny_mixed_artifact, "--out", str(out), "--provider",
                        "cpu", "--batch", "1,3", "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "step.json").read_text())
    assert all(p["mixed_ms"] > 0 for p in res["parts"])
    md = (out / "step.md").read_text()
    assert f"| {res['parts'][1]['mixed_ms']:.3f} |" in md and "mixed = a greedy step with that chunk inside its pass" in md


def test_step_breakdown_estimates_the_scheduler_bar():
    """The scheduler bar read off the parts: a 16-row greedy step (the device pick's figure where measured)
    plus one prompt pass, over the batch-1 greedy step; nothing without both batches."""
    one = {"batch": 1, "step_ms": 1.0, "argmax_ms": 0.1}
    many = {"batch": 16, "step_ms": 2.0, "argmax_ms": 0.2, "device_ms": 1.8, "chunk_ms": 1.2, "prompt_ms": 4.0}
    md = "\n".join(gpu_step.itl_estimate([one, many]))
    assert "16-row greedy step (device pick) 1.800 ms" in md and "3x the batch-1 greedy step (3.300 ms)" in md
    assert "64-column chunk (prompt_width 64, captured): 3.000 ms = **2.73x**" in md
    assert "32-token prompt pass (uncaptured): 5.800 ms = **5.27x**" in md
    assert "mixed.onnx" not in md
    many["mixed_ms"] = 2.0  # the chunk inside the step's pass: the gap is that one pass
    assert "64-column chunk inside the step's pass (mixed.onnx): 2.000 ms = **1.82x**" in "\n".join(gpu_step.itl_estimate([one, many]))
    del many["device_ms"]
    assert "(host pick) 2.200 ms" in "\n".join(gpu_step.itl_estimate([one, many]))
    assert gpu_step.itl_estimate([one]) == [] and gpu_step.itl_estimate([one, {"batch": 16, "error": "x"}]) == []


def test_step_breakdown_refuses_bad_batches(tmp_path, tiny_artifact):
    for bad in ("0", "1,x", ""):
        r = subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.gpu_step", tiny_artifact, "--out", str(tmp_path),
                            "--provider", "cpu", "--batch", bad], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--batch" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)


def test_capture_check_finds_differing_rows():
    a = [[[1, 2, 3]], [[4, 5, 6], [7, 8, 9]]]
    b = [[[1, 2, 3]], [[4, 5, 6], [7, 0, 9]]]
    assert gpu_check.compare(["one", "two"], a, a) == []
    assert gpu_check.compare(["one", "two"], a, b) == [{"call": "two", "row": 1, "first_diff": 1, "length": 3}]
    with pytest.raises(ValueError):  # a call missing from one side is a bug in the check, not a difference
        gpu_check.compare(["one", "two"], a, b[:1])


def _capture(captured: bool, session: bool, divergence=()) -> dict:
    run = lambda asked, has, ms: {"cuda_graph_requested": asked, "session_cuda_graph": has, "load_s": 3.0,  # noqa: E731
                                  "load_warnings": [], "p50_ms": ms, "ttft_ms": 9.0}
    return {"created": "2026-12-03T00:00:00Z", "checkpoint": "synthetic:dialogpt-medium", "precision": "fp16",
            "provider": "CUDAExecutionProvider", "onnxruntime": "1.31.1",
            "runs": {"captured": run(True, session, 0.8), "uncaptured": run(False, False, 4.0)},
            "calls": ["batch 1, prompt 8"], "new_tokens": 32, "tokens_equal": not divergence, "divergence": list(divergence),
            "timing": {"batch": 1, "prompt_len": 32, "new_tokens": 128, "repeats": 5}, "captured": captured, "speedup": 5.0}


def test_capture_verdicts():
    text = lambda r: "\n".join(gpu_check.render(r))  # noqa: E731
    assert "Capture: **captured**: the session was created with enable_cuda_graph" in text(_capture(True, True))
    assert "**not captured**: onnxruntime refused enable_cuda_graph" in text(_capture(False, False))
    differ = text(_capture(False, True, [{"call": "batch 1, prompt 8", "row": 0, "first_diff": 1, "length": 32}]))
    assert "enable_cuda_graph but its tokens differ" in differ and "1 rows differ" in differ
    assert "- batch 1, prompt 8, row 0: first differs at token 1 of 32" in differ


# ---- the GPU bars -------------------------------------------------------------------------------

def _gpu_results(ours_ms: float, compiled_ms: float, itl_p99_ms: float, captured: bool = True) -> dict:
    row = lambda name, ms: {"system": name, "scenario": "decode", "batch": 1, "prompt_len": 32, "p50_ms": ms}  # noqa: E731
    return {"settings": {"provider": "cuda", "prompt_len": [32], "new_tokens": 128},
            "systems": [{"name": "ours fp16 cuda", "kind": "ours", "precision": "fp16", "shape": [24, 1024], "cuda_graph": captured},
                        {"name": "pytorch fp16 cuda", "kind": "pytorch", "precision": "fp16"},
                        {"name": "pytorch-compile fp16 cuda", "kind": "pytorch-compile", "precision": "fp16", "compiled": True}],
            "summary": [row("ours fp16 cuda", ours_ms), row("pytorch fp16 cuda", 19.0), row("pytorch-compile fp16 cuda", compiled_ms),
                        {"system": "ours fp16 cuda", "scenario": "concurrent", "mode": "scheduler", "clients": 16,
                         "itl_p99_ms": itl_p99_ms}]}


def test_gpu_bars_state_each_value_and_verdict():
    text = "\n".join(report._gpu_section(_gpu_results(0.80, 1.60, 2.0), None))
    assert "- **ours fp16 cuda, per token**: p50 **0.80 ms**, step captured (session created with enable_cuda_graph) " \
           "(target ≤ 1 ms with the step captured: met)." in text
    assert "- **ours fp16 cuda against pytorch-compile fp16 cuda**: 0.80 ÷ 1.60 ms = **0.50×** (target < 1: met)." in text
    assert "- **ours fp16 cuda, scheduler at C=16**: p99 inter-token latency 2.00 ms ÷ batch-1 p50 0.80 ms = **2.50×** " \
           "(target ≤ 3: met)." in text
    slow = "\n".join(report._gpu_section(_gpu_results(4.49, 1.60, 35.2, captured=False), _capture(False, False)))
    assert "p50 **4.49 ms**, step **not captured** (target ≤ 1 ms with the step captured: **not met**)." in slow
    assert "= **2.81×** (target < 1: **not met**)." in slow and "= **7.84×** (target ≤ 3: **not met**)." in slow
    assert "## CUDA graph capture check" in slow and "onnxruntime refused enable_cuda_graph" in slow
    # fast but uncaptured is not the bar; a CPU run has no GPU bars, only the capture check when there is one
    assert "(target ≤ 1 ms with the step captured: **not met**)" in "\n".join(report._gpu_section(_gpu_results(0.5, 1.6, 1.0, False), None))
    assert "greedy's pick on the device" not in text  # results from before the field say nothing of it
    picked = _gpu_results(0.80, 1.60, 2.0)
    picked["systems"][0]["device_pick"] = True
    assert "- **ours fp16 cuda**: greedy's pick on the device (pick.onnx, steps of 4 rows or more: batch 64, the " \
           "scheduler): on." in "\n".join(report._gpu_section(picked, None))
    picked["systems"][0]["device_pick"] = False
    assert "**off** (logits copied to the host every step)" in "\n".join(report._gpu_section(picked, None))
    cpu = _gpu_results(0.8, 1.6, 2.0)
    cpu["settings"]["provider"] = "cpu"
    assert report._gpu_section(cpu, None) == []


def _gpu_event(name: str, ts: float, dur: float, cat: str = "kernel") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_kernel_summary_counts_per_step_and_busy_time():
    """Two steps' GPU events (Chrome trace, microseconds): per-step counts and times, busy = the union of
    overlapping intervals (not their sum), kinds by name or category, the longest kernels first; CPU
    events and instants are not the GPU's."""
    events = []
    for t in (0.0, 100.0):
        events += [_gpu_event("Memcpy HtoD (Pageable -> Device)", t, 2, "gpu_memcpy"),
                   _gpu_event("void gemv2T_kernel_val<int, int, __half>", t + 5, 10),
                   _gpu_event("void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits>", t + 12, 6),  # overlaps 3
                   _gpu_event("onnxruntime::contrib::cuda::SkipLayerNormKernelSmall<half>", t + 20, 1),
                   _gpu_event("onnxruntime::cuda::_BinaryElementWiseSimple<half>", t + 22, 1)]
    events += [{"ph": "X", "cat": "cpu_op", "name": "aten::empty", "ts": 0, "dur": 500},
               {"ph": "i", "cat": "kernel", "name": "instant", "ts": 0}]
    warmup = [_gpu_event("void gemv2T_kernel_val<int, int, __half>", -50, 10)]  # before the profiled steps: not counted
    assert gpu_kernels.summarize(warmup + events, steps=2, wall_ms=0.1)["events"] == 5.5  # no annotation: all 11
    events = warmup + events + [{"ph": "X", "cat": "user_annotation", "name": gpu_kernels.MARK, "ts": -1, "dur": 200}]
    s = gpu_kernels.summarize(events, steps=2, wall_ms=0.1)
    assert s["events"] == 5 and s["distinct"] == 5 and s["wall_ms"] == 0.05
    assert s["kernel_us"] == 20 and s["busy_us"] == 17  # 2 + [5, 18) + 1 + 1: the overlap counted once
    kinds = {k["name"]: (k["calls"], k["us"]) for k in s["by_kind"]}
    assert kinds == {"matmul": (1, 10), "attention": (1, 6), "copy": (1, 2), "layer norm": (1, 1), "other": (1, 1)}
    assert [k["name"] for k in s["by_kind"]][:2] == ["matmul", "attention"]
    assert abs(sum(k["share"] for k in s["by_kind"]) - 1) < 1e-9
    assert s["top"][0]["name"].startswith("void gemv2T") and s["top"][0]["kind"] == "matmul" and s["top"][0]["us"] == 10
    assert gpu_kernels.summarize([], steps=3, wall_ms=3.0)["busy_us"] == 0


def test_kernel_listing_on_the_cpu(tmp_path, tiny_artifact):
    """On this machine's CPU-only torch the tool says it measured nothing and why (exit 0, so gpu.sh goes
    on); its profiling loop itself runs here with the CPU activity, whose trace holds no GPU event."""
    from torch.profiler import ProfilerActivity, supported_activities

    from gpt2onnx.runtime import Engine

    out = tmp_path / "k"
    r = subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.gpu_kernels", tiny_artifact, "--out", str(out),
                        "--provider", "cpu", "--batch", "1,2", "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "kernels.json").read_text())
    if ProfilerActivity.CUDA not in supported_activities():
        assert "cannot profile CUDA" in res["skipped"] and res["batches"] == []
        assert "Not measured: torch" in (out / "kernels.md").read_text()
    b = gpu_kernels._batch(Engine.load(tiny_artifact, provider="cpu"), 2, 3, gpu=False)
    assert set(b) == {"batch", "uncaptured"}  # no captured step without CUDA graphs
    assert b["uncaptured"]["steps"] == 3 and b["uncaptured"]["wall_ms"] > 0 and b["uncaptured"]["events"] == 0
    for bad in ("0", "x"):
        r = subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.gpu_kernels", tiny_artifact, "--out", str(out),
                            "--batch", bad], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "--batch" in r.stderr and "Traceback" not in r.stderr


def test_kernel_listing_renders_each_mode_and_failures():
    step = gpu_kernels.summarize([_gpu_event("void gemv2T_kernel_val<__half>", 0, 400),
                                  _gpu_event("void flash::flash_fwd_splitkv_kernel<T>", 500, 100)], steps=1, wall_ms=1.0)
    r = {"created": "t", "checkpoint": "synthetic:dialogpt-medium", "precision": "fp16", "provider": "CUDAExecutionProvider",
         "onnxruntime": "1.31.1", "torch": "2.11.0", "session_cuda_graph": True, "prompt": 32,
         "batches": [{"batch": 1, "captured": step, "uncaptured": step}, {"batch": 16, "error": "RuntimeError: boom"}]}
    md = "\n".join(gpu_kernels.render(r))
    assert "| 1 | captured | 1.000 | 0.500 | 50% | 2 | 2 | 0.500 |" in md
    assert "| 1 | uncaptured | 1.000 | 0.500 | 50% |" in md and "| 16 | **failed**: RuntimeError: boom |" in md
    assert "### Batch 1, captured: by kind" in md and "| matmul | 1.0 | 400.0 | 80% |" in md
    assert "| `void gemv2T_kernel_val<__half>` | matmul | 1.0 | 400.0 | 400.00 |" in md
    assert "does not see inside replayed graphs" not in md
    r["batches"][0]["captured"] = gpu_kernels.summarize([], steps=1, wall_ms=1.0)  # a replay CUPTI does not see into
    assert "At batch 1 the profiler saw under half as many events" in "\n".join(gpu_kernels.render(r))


# ---- benchmarks/gpu.sh --------------------------------------------------------------------------

def test_gpu_script_invocations_parse(tmp_path):
    """gpu.sh run with a stand-in interpreter that records its arguments: the capture check and the bench
    get arguments their own parsers accept, with the baselines, scenarios and output the GPU run needs."""
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    # records each call (one argument a line, then a line "@@") and succeeds; makes the --out directory's report.md
    stub.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" @@ >> {calls}\n'
                    'for ((i = 1; i < $#; i++)); do [[ "${!i}" == --out ]] && j=$((i + 1)) && mkdir -p "${!j}" '
                    '&& touch "${!j}/report.md"; done; exit 0\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "gpu-out"
    out.mkdir()
    (out / "capture.json").write_text("{}")  # a stale check from an earlier run
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHON": str(stub), "OUT": str(out)})
    assert r.returncode == 0, r.stderr
    assert not (out / "capture.json").exists()  # removed before the check, so no stale one lands in the report
    invocations = [c.strip("\n").split("\n") for c in calls.read_text().split("@@\n")[:-1]]
    modules = [c[1:] for c in invocations if c[0] == "-m"]
    # the bars' bench right after the capture check (whose capture.json its report reads), the diagnostics after it
    assert [m[0] for m in modules] == ["pip", "gpt2onnx.cli", "gpt2onnx.benchmarks.gpu_check", "gpt2onnx.cli",
                                       "gpt2onnx.benchmarks.gpu_step", "gpt2onnx.benchmarks.gpu_step", "gpt2onnx.benchmarks.gpu_kernels",
                                       "gpt2onnx.cli", "gpt2onnx.benchmarks.gpu_step"]
    assert modules[1][:2] == ["gpt2onnx.cli", "export"] and "--mixed-step" in modules[1]  # no artifact yet: exported, mixed.onnx too
    check = gpu_check.parser().parse_args(modules[2][1:])
    assert check.out == str(out) and check.provider == "cuda" and check.artifact == "artifacts/dialogpt-medium-fp16-cuda"
    step = gpu_step.parser().parse_args(modules[4][1:])
    assert step.out == str(out) and step.provider == "cuda" and step.artifact == check.artifact and step.batch == [1, 4, 16, 64]
    xqa = gpu_step.parser().parse_args(modules[5][1:])  # the same steps with ORT_ENABLE_XQA=1, into their own folder
    assert xqa.out == str(out / "xqa") and xqa.batch == [1, 16] and xqa.artifact == check.artifact
    kernels = gpu_kernels.parser().parse_args(modules[6][1:])
    assert kernels.out == str(out) and kernels.batch == [1, 16] and kernels.provider == "cuda" and kernels.artifact == check.artifact
    # last, with time left: int4 for CUDA exported (no such artifact yet) and its steps into their own folder
    assert modules[7][1:6] == ["export", "synthetic:dialogpt-medium", "-o", "artifacts/dialogpt-medium-int4-cuda", "--precision"]
    assert modules[7][6:9] == ["int4", "--provider", "cuda"]
    int4 = gpu_step.parser().parse_args(modules[8][1:])
    assert int4.out == str(out / "int4") and int4.artifact == "artifacts/dialogpt-medium-int4-cuda" and int4.provider == "cuda"
    cli = modules[3][1:]
    assert cli[0] == "bench"
    import argparse

    p = argparse.ArgumentParser()
    settings.add_arguments(p)
    a = p.parse_args(cli[1:])
    assert a.artifacts == ["artifacts/dialogpt-medium-fp16-cuda"] and a.out == str(out) and a.provider == "cuda"
    assert a.baselines.split(",") == ["pytorch", "pytorch-compile"]
    assert a.batch == [1, 64] and a.concurrent_clients == [16] and a.concurrent_precisions == ["fp16"]
    assert a.concurrent_prompt_width == 64  # modes chunked64 and mixed64 beside mode scheduler
    assert a.context == [] and a.chat_turns == 0 and a.footprint is False and a.beams == 0
    s = settings.Settings(artifacts=a.artifacts, baselines=a.baselines.split(","), batch=a.batch, prompt_len=a.prompt_len,
                         new_tokens=a.new_tokens, repeats=a.repeats, context=a.context, chat_turns=a.chat_turns,
                         concurrent_clients=a.concurrent_clients, concurrent_precisions=a.concurrent_precisions, provider=a.provider)
    settings.check(s)  # raises on a choice the harness refuses
    assert s.prompt_len == [32] and s.new_tokens == 128


def test_step_breakdown_reports_a_failed_pick_not_the_fallback(tiny_artifact, monkeypatch):
    """When the device pick fails, the Decoder picks on the host; gpu_step must then say the pick failed
    instead of timing the host fallback as the device's figure."""
    from gpt2onnx.runtime import Engine
    from gpt2onnx.runtime.decoder import Pick

    def refuse(self, binding):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(Pick, "run", refuse)
    e = Engine.load(tiny_artifact, provider="cpu", device_pick=True)
    with pytest.warns(RuntimeWarning):
        part = gpu_step._parts(e, 4, 3)
    assert part["pick_error"] == "RuntimeError: operation not permitted when stream is capturing"
    assert "device_ms" not in part and "pick_equal" not in part
    md = "\n".join(gpu_step.render({"created": "t", "checkpoint": "c", "precision": "fp32", "provider": "cpu",
                                    "onnxruntime": "1", "session_cuda_graph": False, "prompt": 32, "pick": True,
                                    "pick_from": 4, "parts": [part]}))
    assert "greedy's pick on the device at batch 4: **failed** (RuntimeError: operation not permitted" in md
    assert "greedy on device ms" not in md


def test_the_concurrent_bar_on_cuda_is_the_gpu_bars_own():
    """The GPU report's concurrent section held the CPU's inter-token bar (<= 5) for the same quantity its GPU
    bars held to <= 3 (reports/gpu/report.md said both)."""
    import json
    import os

    from gpt2onnx.benchmarks import report

    path = os.path.join(os.path.dirname(__file__), "..", "reports", "gpu", "results.json")
    with open(path) as f:
        lines = [ln for ln in report._concurrent_section(json.load(f)) if "bar 2" in ln]
    assert lines and all(f"target ≤ {report.GPU_ITL:g}:" in ln for ln in lines), lines
