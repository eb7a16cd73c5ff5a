"""The benchmark harness on synthetic:tiny: schema, report files, a missing baseline, a damaged artifact,
the concurrent-clients scenario, the CTranslate2 and llama.cpp baselines."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2onnx.benchmarks import figures, harness, loop, plan, results, settings, worker, workloads
from gpt2onnx.benchmarks import report as report_mod
from gpt2onnx.benchmarks.engines import ctranslate2, llamacpp
from gpt2onnx.export import checkpoints
from gpt2onnx.export.convert import ExportOptions, export
from gpt2onnx.runtime.errors import Gpt2OnnxError

from .conftest import QUIET, assert_one_line_error, run_cli

SMALL = dict(batch=[1, 2], prompt_len=[8, 16], new_tokens=4, repeats=2, context=[16, 64, 126], context_new_tokens=4,
             chat_turns=3, chat_user_len=6, chat_reply_len=4, concurrent_clients=[])
# the concurrent scenario on the tiny model: short requests, every mode, two client counts
CONC = dict(concurrent_clients=[1, 3], concurrent_requests=7, concurrent_repeats=1, concurrent_prompt_len=[4, 40],
            concurrent_reply_len=[3, 12])


def test_bench_schema_and_report(tmp_path, tiny_artifact, monkeypatch):
    real = plan.baseline_missing
    monkeypatch.setattr(plan, "baseline_missing",
                        lambda k, *a: "optimum-onnx is not installed (test)" if k == "optimum" else real(k, *a))
    s = settings.Settings(artifacts=[tiny_artifact], baselines=["pytorch", "optimum"], out=str(tmp_path / "rep"),
                         cache=str(tmp_path / "cache"), **SMALL)
    res = harness.run(s, log=lambda m: None)
    out = tmp_path / "rep"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema_version"] == results.SCHEMA_VERSION == res["schema_version"]
    for key in ("cpu", "cores_logical", "memory_bandwidth_gbs", "versions", "gpu"):
        assert key in on_disk["machine"]
    assert on_disk["machine"]["memory_bandwidth_gbs"]["read"] > 0
    assert [x["kind"] for x in on_disk["systems"]] == ["ours", "pytorch"]
    assert on_disk["skipped"] == [{"baseline": "optimum", "reason": "optimum-onnx is not installed (test)"}]
    # 2 decode + 1 throughput (batch 2) + 2 context points (126 + 4 > 128 is dropped) + 3 chat turns,
    # 2 systems, 2 repeats
    assert len(on_disk["records"]) == (2 + 1 + 2 + 3) * 2 * 2
    chat = {(r["system"], r["prompt_len"]): r["cached_tokens"] for r in on_disk["records"] if r["scenario"] == "chat"}
    assert sorted({p for _, p in chat}) == [7, 19, 31]  # user 6 + EOS, then + reply 4 + EOS + user 6 + EOS per turn
    assert [chat["ours fp32 cpu", p] for p in (7, 19, 31)] == [0, 10, 22]  # all but the last reply token kept
    assert {chat["pytorch fp32 cpu", p] for p in (7, 19, 31)} == {0}
    for r in on_disk["records"]:
        assert r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] and r["ttft_ms"] > 0 and r["tokens_per_s"] > 0
    ours = next(x for x in on_disk["systems"] if x["kind"] == "ours")
    assert ours["peak_rss_mb"] > 0 and ours["size_bytes"] > 0 and ours["weights_bytes_per_token"] > 0
    assert ours["accuracy"]["decode_vs_pytorch_fp32"]["max_abs_logit_diff"] <= ours["accuracy"]["decode_vs_pytorch_fp32"]["tolerance"]
    summary = [r for r in on_disk["summary"] if r["system"] == ours["name"] and r["scenario"] == "decode"]
    assert len(summary) == 2 and all(0 < r["bandwidth_fraction"] for r in summary)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(on_disk["records"])
    report = (out / "report.md").read_text()
    assert "| ours fp32 cpu |" in report and "| pytorch fp32 cpu |" in report and "× pytorch fp32 cpu" in report
    assert "Skipped baseline **optimum**" in report
    assert "KV cache dtype: ours fp32 cpu float32, pytorch fp32 cpu float32 (" in report  # each system says its own
    assert "## Chat: time to first token per turn" in report and "| 7 | 19 | 31 |" in report
    for png in ("latency_vs_context.png", "throughput_vs_batch.png", "precisions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [line for line in report.splitlines() if line.endswith("|  |")]  # no empty trailing column
    # `python -m gpt2onnx.benchmarks.report DIR` re-renders the same report from results.json
    (out / "report.md").unlink()
    subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.report", str(out)], check=True, capture_output=True)
    assert (out / "report.md").read_text() == report
    # a writer that fails half-way (here the plots, after report.md) leaves the directory as it was and no
    # new one: a report is written whole or not at all
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(report_mod, "_plots", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    for target in (out, tmp_path / "new" / "rep"):
        on_disk["created"] = "changed"
        with pytest.raises(OSError, match="No space left"):
            results.write(on_disk, str(target))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "rep"]


def test_bench_cli_with_optimum(tmp_path, tiny_artifact):
    r = run_cli("bench", tiny_artifact, "--baselines", "optimum", "--batch", "1", "--prompt-len", "8", "--new-tokens", "3",
                "--repeats", "1", "--context", "16", "--context-new-tokens", "3", "--chat-turns", "2", "--concurrent-clients", "2",
                "--concurrent-requests", "3", "--concurrent-reply-len", "2,5", "--out", str(tmp_path / "rep"),
                "--cache", str(tmp_path / "cache"), timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [x["kind"] for x in res["systems"]] == ["ours", "optimum"]
    assert [x["kv_cache"] for x in res["systems"]] == ["float32", "float32"]  # read from optimum's graph inputs
    import onnx

    optimized = tmp_path / "cache" / "optimum-O3-cpu-hf-tiny-seed0" / "model.onnx"  # as optimum's docs run GPT-2
    ops = {n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node}
    assert {"SkipLayerNormalization", "FastGelu"} <= ops, ops
    assert "optimize O3" in open(tmp_path / "rep" / "report.md").read()
    # no int8 artifact given: the first artifact gets the concurrent scenario; optimum runs serially
    conc = {(r["system"], r["mode"]): r for r in res["records"] if r["scenario"] == "concurrent"}
    assert sorted(conc) == [("optimum fp32 cpu", "serial"), ("ours fp32 cpu", "http"), ("ours fp32 cpu", "scheduler"),
                            ("ours fp32 cpu", "serial"), ("ours fp32 cpu", "static")]
    assert len({r["tokens"] for r in conc.values()}) == 1  # the same requests, every reply exactly its length


def test_bench_optimum_int8_beside_ours_int8(tmp_path, tiny_artifact):
    """With an int8 artifact on a CPU, optimum runs its own int8 too (optimum-cli onnxruntime quantize
    for this CPU's instruction set, of its plain export), and the int8 row's ratio is against it."""
    import onnx

    from gpt2onnx.benchmarks.engines import optimum

    int8 = export(ExportOptions("synthetic:tiny", str(tmp_path / "int8"), precision="int8"), log=QUIET)
    s = settings.Settings(artifacts=[tiny_artifact, int8], baselines=["optimum"], out=str(tmp_path / "rep"),
                          cache=str(tmp_path / "cache"), **{**SMALL, "repeats": 1, "batch": [1], "context": [], "chat_turns": 0})
    res = harness.run(s, log=lambda m: None)
    assert [(x["name"], x["kv_cache"]) for x in res["systems"]] == [
        ("ours fp32 cpu", "float32"), ("ours int8 cpu", "int8"), ("optimum fp32 cpu", "float32"), ("optimum int8 cpu", "float32")]
    q = res["systems"][3]
    isa = optimum.cpu_isa()
    assert q["path"].endswith(f"optimum-int8-{isa}-hf-tiny-seed0") and isa in [name for name, _ in optimum.ISAS] + ["arm64"]
    ops = {n.op_type for n in onnx.load(os.path.join(q["path"], "model.onnx"), load_external_data=False).graph.node}
    assert "DynamicQuantizeLinear" in ops and "MatMulInteger" in ops, ops  # dynamic int8, as optimum quantizes for a CPU
    # one plain export serves both the O3 model and the int8 one
    assert sorted(d for d in os.listdir(tmp_path / "cache") if d.startswith("optimum-")) == [
        "optimum-O3-cpu-hf-tiny-seed0", f"optimum-int8-{isa}-hf-tiny-seed0", "optimum-plain-hf-tiny-seed0"]
    report = (tmp_path / "rep" / "report.md").read_text()
    assert f"`optimum-cli onnxruntime quantize --{isa}`" in report and "| × optimum same precision |" in report
    ratio = lambda name: next(ln for ln in report.splitlines() if ln.startswith(f"| {name} |")).rstrip(" |").rsplit("| ", 1)[1]  # noqa: E731
    assert ratio("optimum int8 cpu") == "1.00" and ratio("ours int8 cpu") != "—"  # each precision against its own


def test_bench_damaged_artifact(tmp_path, tiny_artifact):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    (bad / "model.onnx").write_bytes(b"garbage")
    r = run_cli("bench", str(bad), "--baselines", "", "--out", str(tmp_path / "rep"))
    assert_one_line_error(r, "truncated or replaced", "re-export")
    assert not (tmp_path / "rep").exists()


def test_bench_bad_baseline(tiny_artifact, tmp_path):
    assert_one_line_error(run_cli("bench", tiny_artifact, "--baselines", "tensorrt", "--out", str(tmp_path / "r")), "unknown baseline")


def test_bench_chat_reply_too_short(tiny_artifact, tmp_path):
    """A 1-token reply has no decode step to time: refused up front, not a crash mid-run."""
    r = run_cli("bench", tiny_artifact, "--baselines", "", "--chat-reply-len", "1", "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "--chat-reply-len >= 2")
    assert not (tmp_path / "r").exists()


def _reply_tokens(n: int, mix: dict) -> list[int]:
    return [r for _, r in workloads.concurrent_requests(n, mix["prompt_len"], mix["reply_len"], 1000)]


def test_concurrent_plan_fits_the_context():
    s = settings.Settings(artifacts=[])
    assert plan.concurrent_plan(s, 1024) == {"clients": [1, 4, 16, 64], "requests": {1: 64, 4: 64, 16: 64, 64: 128},
                                                 "prompt_len": [16, 256], "reply_len": [16, 128]}
    tiny = plan.concurrent_plan(s, 128, log=lambda m: None)  # synthetic:tiny has 128 positions
    assert tiny["prompt_len"][1] + tiny["reply_len"][1] <= 128 and tiny["reply_len"][0] >= 2
    assert plan.concurrent_plan(settings.Settings(artifacts=[], concurrent_clients=[0]), 128) is None


@pytest.mark.parametrize("mode", (*settings.OURS_MODES, "chunked8", "mixed8"))
def test_concurrent_worker_records(tiny_artifact, tiny_mixed_artifact, mode):
    """Every request of the closed loop gets exactly its reply length, with stamps in order."""
    mix = {"prompt_len": [4, 40], "reply_len": [3, 12]}
    w = worker.Worker(worker.SystemSpec("tiny", "ours", tiny_mixed_artifact if mode == "mixed8" else tiny_artifact))
    try:
        reqs = w.request("concurrent", mode=mode, clients=3, requests=7, reply_cap=0, max_batch=3, **mix)["requests"]
    finally:
        w.close()
    asked = workloads.concurrent_requests(7, mix["prompt_len"], mix["reply_len"], w.loaded["manifest"]["config"]["vocab_size"])
    assert [(r["prompt_len"], r["new_tokens"]) for r in reqs] == [(len(p), n) for p, n in asked]
    for r in reqs:
        assert len(r["token_s"]) == r["new_tokens"]
        assert r["submitted_s"] < r["token_s"][0] and (np.diff(r["token_s"]) > 0).all()
    spans = sorted((r["token_s"][0], r["token_s"][-1]) for r in reqs)
    if mode == "serial":  # behind a lock: one request at a time
        assert all(b[0] > a[1] for a, b in zip(spans, spans[1:]))
    if mode == "static":  # a batch shares its stamps; the next batch starts after the last one ends
        firsts = sorted({s for s, _ in spans})
        ends = [max(e for s, e in spans if s == f) for f in firsts]
        assert len(firsts) >= 3  # 7 requests, at most 3 a batch (one batch would pass the next line unchecked)
        assert all(f > e for e, f in zip(ends, firsts[1:]))
    fig = figures.concurrent_figures(reqs)
    assert fig["tokens"] == sum(n for _, n in asked) and fig["requests"] == 7
    assert fig["max_stall_ms"] >= fig["itl_p99_ms"] >= fig["itl_p50_ms"] > 0


def test_concurrent_figures_refuse_disordered_stamps():
    good = {"submitted_s": 1.0, "token_s": [1.5, 1.6, 1.8]}
    assert figures.concurrent_figures([good])["max_stall_ms"] == pytest.approx(200)
    with pytest.raises(Gpt2OnnxError, match="out of order"):
        figures.concurrent_figures([good, {"submitted_s": 1.0, "token_s": [1.5, 1.5]}])
    with pytest.raises(Gpt2OnnxError, match="out of order"):
        figures.concurrent_figures([{"submitted_s": 2.0, "token_s": [1.5, 1.6]}])


def test_bench_concurrent(tmp_path, tiny_mixed_artifact):
    s = settings.Settings(artifacts=[tiny_mixed_artifact], baselines=[], out=str(tmp_path / "rep"),
                          **{**SMALL, **CONC, "chat_turns": 0, "concurrent_prompt_width": 8})
    # --concurrent-prompt-width 8 adds the scheduler in fixed 8-column chunks, each a pass of its own (chunked8)
    # and one a step in the step's pass (mixed8: the artifact has mixed.onnx)
    modes = (*settings.OURS_MODES, "chunked8", "mixed8")
    res = harness.run(s, log=lambda m: None)
    on_disk = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert on_disk["concurrent"] == {"clients": [1, 3], "requests": {"1": 7, "3": 7}, "prompt_len": [4, 40], "reply_len": [3, 12]}
    conc = [r for r in on_disk["records"] if r["scenario"] == "concurrent"]
    assert sorted((r["mode"], r["clients"]) for r in conc) == sorted((m, c) for m in modes for c in (1, 3))
    expected = sum(_reply_tokens(7, res["concurrent"]))  # every reply exactly its length
    for r in conc:
        assert r["system"] == "ours fp32 cpu" and r["requests"] == 7 and r["tokens"] == expected
        assert r["max_batch"] == r["clients"]
        assert r["requests_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(expected / r["wall_s"])
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"] <= r["max_stall_ms"]
    summary = [r for r in on_disk["summary"] if r["scenario"] == "concurrent"]
    assert len(summary) == len(conc) and all(r["repeats"] == 1 for r in summary)
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "## Concurrent clients" in report and "### 3 clients: 7 requests" in report
    assert "| ours fp32 cpu | scheduler |" in report and "| ours fp32 cpu | static |" in report
    assert "| ours fp32 cpu | chunked8 |" in report and "**chunked8** = the scheduler with `prompt_width` 8" in report
    assert "| ours fp32 cpu | mixed8 |" in report and "**mixed8** = the same chunks, one a step running in" in report
    assert "bar 1** (C=3)" in report and "bar 2** (C=3)" in report  # no C=16 point: the largest C states the bars
    assert (tmp_path / "rep" / "concurrent.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "rep" / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(on_disk["records"])


def test_bench_concurrent_bad_range(tiny_artifact, tmp_path):
    r = run_cli("bench", tiny_artifact, "--baselines", "", "--concurrent-reply-len", "1,8", "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "--concurrent-reply-len takes LO,HI")
    r = run_cli("bench", tiny_artifact, "--baselines", "", "--concurrent-precisions", "in8", "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "unknown precision 'in8'", "int8")
    r = run_cli("bench", tiny_artifact, "--baselines", "", "--concurrent-prompt-width", "-1", "--out", str(tmp_path / "r"))
    assert_one_line_error(r, "--concurrent-prompt-width >= 0")
    assert not (tmp_path / "r").exists()


# ---- the anchors: CTranslate2 and llama.cpp converted from the checkpoint the artifacts came from -------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, tiny):
    """synthetic:tiny as a Hugging Face directory, as the harness saves it for its baselines."""
    path = str(tmp_path_factory.mktemp("hf") / "hf-tiny-seed0")
    checkpoints.save_hf_checkpoint(tiny, path)
    return path


@pytest.fixture(scope="module")
def tiny_int4_artifact(tmp_path_factory):
    return export(ExportOptions("synthetic:tiny", str(tmp_path_factory.mktemp("art") / "tiny-int4"), precision="int4"), log=QUIET)


def _generated(spec: worker.SystemSpec, batch: int, prompt_len: int, new_tokens: int) -> list[list[int]]:
    w = worker.Worker(spec)
    try:
        return w.request("generate", batch=batch, prompt_len=prompt_len, new_tokens=new_tokens)["tokens"]
    finally:
        w.close()


def test_checkpoints_we_save_carry_n_ctx(tiny_hf):
    """llama.cpp's GGUF converter reads n_ctx, as real GPT-2 / DialoGPT configs have it."""
    assert json.loads((Path(tiny_hf) / "config.json").read_text())["n_ctx"] == 128


def test_ctranslate2_fp32_greedy_equals_pytorch(tiny_hf, tmp_path):
    path = ctranslate2.ctranslate2_model(tiny_hf, str(tmp_path), "fp32", log=QUIET)
    ct2 = _generated(worker.SystemSpec("ct2", "ctranslate2", path, precision="fp32"), 2, 8, 12)
    pt = _generated(worker.SystemSpec("pt", "pytorch", tiny_hf), 2, 8, 12)
    assert [len(t) for t in ct2] == [12, 12] and len(set(ct2[0])) > 3  # varied tokens, not one repeated
    assert ct2 == pt


def test_ctranslate2_int8_converts_and_generates(tiny_hf, tmp_path):
    fp32 = ctranslate2.ctranslate2_model(tiny_hf, str(tmp_path), "fp32", log=QUIET)
    int8 = ctranslate2.ctranslate2_model(tiny_hf, str(tmp_path), "int8", log=QUIET)
    assert os.path.getsize(os.path.join(int8, "model.bin")) < 0.4 * os.path.getsize(os.path.join(fp32, "model.bin"))
    assert ctranslate2.ctranslate2_model(tiny_hf, str(tmp_path), "int8", log=lambda m: pytest.fail(m)) == int8  # cached
    w = worker.Worker(worker.SystemSpec("ct2", "ctranslate2", int8, precision="int8"))
    try:
        assert w.loaded["weights"]["bytes_per_token"] < os.path.getsize(os.path.join(int8, "model.bin"))
        for batch in (1, 3):
            r = w.request("generate", batch=batch, prompt_len=8, new_tokens=7)
            assert [len(t) for t in r["tokens"]] == [7] * batch and len(r["step_s"]) == 6 and r["ttft_s"] > 0
        turns = w.request("chat", turns=2, user_len=6, reply_len=4)["turns"]
        assert [t["cached_tokens"] for t in turns] == [0, 0]  # no cache between turns: the whole history runs
    finally:
        w.close()


def test_worker_death_is_one_line(tiny_artifact):
    w = worker.Worker(worker.SystemSpec("tiny", "ours", tiny_artifact))
    w.proc.kill()  # what a segfault in a baseline's native code looks like from the parent
    with pytest.raises(worker.WorkerDied, match=r"^its process died \(killed by signal 9\)$"):
        w.request("generate", batch=1, prompt_len=4, new_tokens=2)
    w.close()


def test_bench_drops_a_baseline_whose_process_dies(tmp_path, tiny_artifact, monkeypatch):
    """A baseline that crashes mid-run (llama.cpp's AMX path did, on a VM that advertises AMX) is
    dropped with the reason in the report; the other systems' figures are all there."""

    class Crashing(worker.Worker):
        calls = 0

        def request(self, kind, **args):
            if self.spec.kind == "pytorch" and kind == "generate":
                Crashing.calls += 1
                if Crashing.calls == 3:  # after the warm-up: some of its records exist, none may be reported
                    self.proc.kill()
            return super().request(kind, **args)

    monkeypatch.setattr(loop, "Worker", Crashing)
    s = settings.Settings(artifacts=[tiny_artifact], baselines=["pytorch"], out=str(tmp_path / "rep"),
                         cache=str(tmp_path / "cache"), **{**SMALL, "chat_turns": 0, "context": [16]})
    res = harness.run(s, log=lambda m: None)
    assert [x["name"] for x in res["systems"]] == ["ours fp32 cpu"]
    assert {r["system"] for r in res["records"]} == {"ours fp32 cpu"}
    assert len(res["records"]) == (2 + 1 + 1) * 2  # every point of ours, both repeats
    (skip,) = res["skipped"]
    assert skip["baseline"] == "pytorch fp32 cpu" and skip["reason"].startswith("its process died (killed by signal 9) while ")
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "Skipped baseline **pytorch fp32 cpu**: its process died" in report and "| pytorch fp32 cpu |" not in report

    monkeypatch.setattr(Crashing, "calls", 0)
    s.baselines, s.out = [], str(tmp_path / "rep2")
    monkeypatch.setattr(Crashing, "request", lambda self, kind, **a: (self.proc.kill(), worker.Worker.request(self, kind, **a))[1])
    with pytest.raises(Gpt2OnnxError, match=r"^ours fp32 cpu: its process died \(killed by signal 9\) while decode b1 p8$"):
        harness.run(s, log=lambda m: None)  # ours dying is a failure, not a skipped row


def test_bench_anchor_rows_and_skips(tmp_path, tiny_artifact, tiny_int4_artifact):
    """CTranslate2 gets a row per precision it has (fp32), a skip line for the one it lacks (int4),
    and its rows sit beside ours in the tables; an absent llama.cpp is one skip line."""
    nowhere = str(tmp_path / "no-llama.cpp")
    why = plan.baseline_missing("llamacpp", nowhere)
    assert "make llamacpp" in why and "\n" not in why
    s = settings.Settings(artifacts=[tiny_artifact, tiny_int4_artifact], baselines=["ctranslate2", "llamacpp"],
                         llamacpp_src=nowhere, out=str(tmp_path / "rep"), cache=str(tmp_path / "cache"),
                         **{**SMALL, "repeats": 1, "context": [16], "chat_turns": 2})
    res = harness.run(s, log=lambda m: None)
    assert [(x["name"], x["kind"], x["precision"]) for x in res["systems"]] == [
        ("ours fp32 cpu", "ours", "fp32"), ("ours int4 cpu", "ours", "int4"), ("ctranslate2 float32 cpu", "ctranslate2", "fp32")]
    assert res["skipped"] == [{"baseline": "ctranslate2 int4", "reason": "CTranslate2's int4 takes AWQ checkpoints only"},
                              {"baseline": "llamacpp", "reason": why}]
    ct2 = res["systems"][2]
    assert ct2["size_bytes"] > 0 and ct2["peak_rss_mb"] > 0 and ct2["weights_bytes_per_token"] > 0
    scenarios = {(r["scenario"], r["batch"]) for r in res["records"] if r["system"] == ct2["name"]}
    assert scenarios == {("decode", 1), ("throughput", 2), ("context", 1), ("chat", 1)}
    report = (tmp_path / "rep" / "report.md").read_text()
    assert f"Skipped baseline **llamacpp**: {why}." in report and "Skipped baseline **ctranslate2 int4**" in report
    assert "× CTranslate2 same precision |" in report
    assert "KV cache dtype: ours fp32 cpu float32, ours int4 cpu int8, ctranslate2 float32 cpu float32 (" in report
    sections = {sec.split("\n", 1)[0]: sec for sec in report.split("\n## ")}
    for title in ("Batch 1 decode", "Time to first token", "Throughput by batch", "Per-token latency", "Chat"):
        sec = next(v for k, v in sections.items() if k.startswith(title))
        assert "| ctranslate2 float32 cpu |" in sec, title


def _llamacpp_or_skip() -> None:
    """The llama.cpp tests need `make llamacpp` (minutes of compiling, not part of make test): skipped,
    saying so, only where it has not run."""
    why = llamacpp.missing()
    if why:
        pytest.skip(f"llama.cpp is not built here: {why}")


def test_llamacpp_conversions_load_and_generate(tiny_hf, tmp_path):
    _llamacpp_or_skip()
    sizes = {}
    for precision, gtype in llamacpp.GGUF_TYPES.items():
        path = llamacpp.gguf_model(tiny_hf, str(tmp_path), precision, log=QUIET)
        info = llamacpp.gguf_info(path)
        assert path.endswith(f"model-{gtype}.gguf") and info["type"] == gtype and 0 < info["bytes_per_token"] < os.path.getsize(path)
        sizes[gtype] = os.path.getsize(path)
        w = worker.Worker(worker.SystemSpec(f"llama.cpp {gtype}", "llamacpp", path, precision=precision))
        try:
            assert w.loaded["max_batch"] == 1 and w.loaded["weights"]["bytes_per_token"] == info["bytes_per_token"]
            r = w.request("generate", batch=1, prompt_len=8, new_tokens=12)
            assert [len(t) for t in r["tokens"]] == [12] and len(r["step_s"]) == 11 and r["ttft_s"] > 0
            assert r["tokens"] == w.request("generate", batch=1, prompt_len=8, new_tokens=12)["tokens"]  # greedy, fresh cache
            turns = w.request("chat", turns=3, user_len=6, reply_len=4)["turns"]
            assert [t["cached_tokens"] for t in turns] == [0, 10, 22]  # the binding keeps all but the last reply token
            assert w.request("memory")["peak_rss_mb"] > 0
        finally:
            w.close()
    assert sizes["F32"] > sizes["Q8_0"] > sizes["Q4_0"]


def test_llamacpp_f32_follows_pytorch(tiny_hf, tmp_path):
    """The F32 conversion is the same model: greedy tokens agree with PyTorch's (llama.cpp keeps its
    KV cache in fp16, so a near tie late in the reply may differ; the first tokens may not)."""
    _llamacpp_or_skip()
    path = llamacpp.gguf_model(tiny_hf, str(tmp_path), "fp32", log=QUIET)
    llama = _generated(worker.SystemSpec("llama.cpp", "llamacpp", path), 1, 8, 12)[0]
    pt = _generated(worker.SystemSpec("pt", "pytorch", tiny_hf), 1, 8, 12)[0]
    assert llama[:4] == pt[:4], (llama, pt)


def test_bench_llamacpp_leaves_batch_cells_empty(tmp_path, tiny_artifact, monkeypatch):
    """Without llama.cpp's C++ tools (llama-batched-bench) the binding runs batch 1 only, and the report
    says so."""
    _llamacpp_or_skip()
    monkeypatch.setattr(llamacpp, "tools_missing", lambda *a: "not built (test)")
    s = settings.Settings(artifacts=[tiny_artifact], baselines=["llamacpp"], out=str(tmp_path / "rep"),
                         cache=str(tmp_path / "cache"), **{**SMALL, "repeats": 1, "context": [16], "chat_turns": 2})
    res = harness.run(s, log=lambda m: None)
    assert [x["name"] for x in res["systems"]] == ["ours fp32 cpu", "llama.cpp F32 cpu"] and res["skipped"] == []
    scenarios = {(r["scenario"], r["batch"]) for r in res["records"] if r["system"] == "llama.cpp F32 cpu"}
    assert scenarios == {("decode", 1), ("context", 1), ("chat", 1)}  # no batch 2
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "× llama.cpp same precision |" in report and "llama.cpp runs batch 1 only" in report
    throughput = report.split("## Throughput by batch", 1)[1].split("\n## ", 1)[0]
    row = next(ln for ln in throughput.splitlines() if ln.startswith("| llama.cpp F32 cpu |"))
    assert row.endswith("| — |") and row.count("|") == 4  # batch 1 measured, batch 2 empty


def _llamacpp_tools_or_skip() -> None:
    """llama.cpp's C++ tools need `make llamacpp` too (it builds them beside the binding): skipped, saying
    so, only where it has not run."""
    _llamacpp_or_skip()
    why = llamacpp.tools_missing()
    if why:
        pytest.skip(f"llama.cpp's C++ tools are not built here: {why}")


def test_llama_bench_measures_every_point_and_rss(tiny_hf, tmp_path):
    _llamacpp_tools_or_skip()
    path = llamacpp.gguf_model(tiny_hf, str(tmp_path), "int8", log=QUIET)
    b = llamacpp.llama_bench(path, threads=1, prompts=[8, 20], decode=[(8, 12), (20, 12), (30, 4)], repetitions=2)
    assert sorted((p["prompt_len"], p["flash_attn"]) for p in b["pp"]) == [(8, False), (8, True), (20, False), (20, True)]
    assert sorted((t["depth"], t["new_tokens"], t["flash_attn"]) for t in b["tg"]) == [
        (8, 12, False), (8, 12, True), (20, 12, False), (20, 12, True), (30, 4, False), (30, 4, True)]
    assert b["repetitions"] == 2 and (b["tg"][0]["depth"], b["tg"][0]["new_tokens"]) == (8, 12)
    for t in b["tg"]:
        assert 0 < t["ms_per_token"] < 1e3 and t["tokens_per_s"] == pytest.approx(1e3 / t["ms_per_token"], rel=0.2)
    for p in b["pp"]:
        assert 0 < p["ms"] and p["tokens_per_s"] == pytest.approx(p["prompt_len"] / (p["ms"] / 1e3), rel=0.2)
    assert 1 < b["peak_rss_mb"] < 2000  # a fresh llama-bench process, not this one
    # the first points in processes of their own (the footprint's), then the prompts, then a process per count of new tokens
    assert [c.split("-o json ")[1] for c in b["commands"]] == [
        "-p 8 -n 0", "-p 0 -n 12 -d 8", "-p 20 -n 0", "-p 0 -n 12 -d 20", "-p 0 -n 4 -d 30"]
    assert "-lm none -fa 0,1" in b["commands"][0]
    b = llamacpp.llama_bench(path, threads=1, prompts=[8], decode=[(8, 12), (20, 12), (30, 4)], repetitions=1)
    assert [c.split("-o json ")[1] for c in b["commands"][2:]] == ["-p 0 -n 12 -d 20", "-p 0 -n 4 -d 30"]  # no prompt test left
    with pytest.raises(Gpt2OnnxError, match="llama-bench failed"):
        llamacpp.llama_bench(str(tmp_path / "missing.gguf"), 1, [8], [(8, 12)], repetitions=1)


def test_llama_batched_bench_measures_each_batch_both_ways(tiny_hf, tmp_path):
    _llamacpp_tools_or_skip()
    path = llamacpp.gguf_model(tiny_hf, str(tmp_path), "int8", log=QUIET)
    b = llamacpp.batched_bench(path, threads=1, prompt_len=8, new_tokens=6, batches=[1, 3])
    assert [(x["batch"], x["flash_attn"]) for x in b] == [(1, False), (3, False), (1, True), (3, True)]
    for x in b:
        assert (x["prompt_len"], x["new_tokens"]) == (8, 6) and x["ttft_ms"] > 0
        assert 0 < x["tokens_per_s"] < x["decode_tokens_per_s"]  # the end-to-end rate pays the prompts too
    with pytest.raises(Gpt2OnnxError, match="llama-batched-bench failed"):
        llamacpp.batched_bench(str(tmp_path / "missing.gguf"), 1, 8, 6, [1])


def test_llama_server_runs_the_concurrent_clients_and_stops(tiny_hf, tmp_path):
    """llama-server with a slot per client: every reply exactly its length, stamps in order, and the
    server gone when the call returns."""
    _llamacpp_tools_or_skip()
    import psutil

    path = llamacpp.gguf_model(tiny_hf, str(tmp_path), "fp32", log=QUIET)
    asked = workloads.concurrent_requests(7, (4, 40), (3, 12), 1000)
    before = {c.pid for c in psutil.Process().children()}
    recs = llamacpp.server_concurrent(path, threads=1, clients=3, requests=asked, n_ctx=128)
    assert [(r["prompt_len"], r["new_tokens"]) for r in recs] == [(len(p), n) for p, n in asked]
    assert all(len(r["token_s"]) == r["new_tokens"] for r in recs)
    fig = figures.concurrent_figures(recs)  # raises on stamps out of order
    assert fig["requests"] == 7 and fig["tokens"] == sum(n for _, n in asked)
    assert {c.pid for c in psutil.Process().children()} <= before  # the server stopped itself


def test_bench_llamacpp_server_mode_and_path(tmp_path, tiny_artifact):
    """With the tools built the run measures llama.cpp's concurrent clients through llama-server and
    names which path its batch-1 rows come from."""
    _llamacpp_tools_or_skip()
    s = settings.Settings(artifacts=[tiny_artifact], baselines=["llamacpp"], out=str(tmp_path / "rep"),
                          cache=str(tmp_path / "cache"), concurrent_precisions=["fp32"],
                          **{**SMALL, **CONC, "repeats": 1, "context": [16], "chat_turns": 0, "concurrent_clients": [2]})
    res = harness.run(s, log=lambda m: None)
    conc = {(r["system"], r["mode"]) for r in res["records"] if r["scenario"] == "concurrent"}
    assert ("llama.cpp F32 cpu", "server") in conc
    llama = next(x for x in res["systems"] if x["kind"] == "llamacpp")
    path = llama["llamacpp_path"]
    assert path["used"] in ("llama-bench", "llama-cpp-python")
    # every batch-1 point the binding ran, measured by llama-bench too: decode and context, the prompt's TTFT
    d8, d16, c16 = path["points"]
    assert [(p["scenario"], p["prompt_len"]) for p in path["points"]] == [("decode", 8), ("decode", 16), ("context", 16)]
    assert d8["llama_bench_ttft_ms"] > 0 and d16["llama_bench_ttft_ms"] > 0 and c16["llama_bench_ttft_ms"] is None
    assert d16["llama_bench_ms"] == c16["llama_bench_ms"] > 0  # the same point (16 tokens, then 4), measured once
    # batch 2, which the binding cannot run: llama-batched-bench's, one run per repeat
    (thr,) = [r for r in res["summary"] if r["system"] == "llama.cpp F32 cpu" and r["scenario"] == "throughput"]
    assert (thr["batch"], thr["prompt_len"], thr["new_tokens"], thr["source"]) == (2, 8, 4, "llama-batched-bench")
    assert 0 < thr["tokens_per_s"] < thr["decode_tokens_per_s"] and len(path["llama_bench"]["batched"]) == 2  # off and on
    assert all(len(t["runs"]) == 1 for t in path["llama_bench"]["tg"])  # one llama-bench run per timed repeat
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "**llama.cpp F32 cpu** rows: at each batch-1 point (decode and context), the faster of" in report
    assert "(median of 1 run, one per repeat between the other systems'" in report
    assert "llama.cpp's batch > 1 cells are llama.cpp's own llama-batched-bench" in report
    assert "## llama.cpp's two paths (batch 1)" in report and "| llama.cpp F32 cpu | context: prompt 16, " in report
    assert "**server** = llama.cpp's own llama-server" in report and "| llama.cpp F32 cpu | server |" in report


def test_llama_bench_runs_of_the_repeats_make_one_median():
    def run(tg, pp, rss):
        return {"pp": [{"prompt_len": 32, "flash_attn": fa, "ms": pp + fa, "tokens_per_s": 32e3 / (pp + fa)} for fa in (0, 1)],
                "tg": [{"depth": 32, "new_tokens": 64, "flash_attn": False, "ms_per_token": tg, "tokens_per_s": 1e3 / tg},
                       {"depth": 500, "new_tokens": 16, "flash_attn": False, "ms_per_token": 2 * tg, "tokens_per_s": 5e2 / tg},
                       {"depth": 500, "new_tokens": 16, "flash_attn": True, "ms_per_token": 3 * tg, "tokens_per_s": 1e3 / 3 / tg}],
                "batched": [{"batch": 4, "prompt_len": 32, "new_tokens": 64, "flash_attn": fa, "tokens_per_s": 100.0 * tg + fa,
                             "decode_tokens_per_s": 200.0 * tg + fa, "ttft_ms": pp * 4} for fa in (False, True)],
                "peak_rss_mb": rss, "repetitions": 1, "commands": ["x"]}
    m = llamacpp.median_of([run(6.0, 40.0, 160.0), run(9.0, 30.0, 170.0), run(5.0, 50.0, 165.0)])
    (pp, pp_fa), (tg, ctx, ctx_fa) = m["pp"], m["tg"]  # a point per flash-attention setting, medians apart
    assert tg["ms_per_token"] == 6.0 and tg["tokens_per_s"] == pytest.approx(1e3 / 6.0) and tg["runs"] == [6.0, 9.0, 5.0]
    assert ctx["ms_per_token"] == 12.0 and (ctx["depth"], ctx["new_tokens"], ctx["flash_attn"]) == (500, 16, False)
    assert ctx_fa["ms_per_token"] == 18.0 and ctx_fa["flash_attn"] is True
    assert pp["ms"] == 40.0 and pp["runs"] == [40.0, 30.0, 50.0] and pp["prompt_len"] == 32 and pp_fa["ms"] == 41.0
    assert m["peak_rss_mb"] == 170.0 and m["repetitions"] == 3
    b_off, b_on = m["batched"]
    assert (b_off["batch"], b_off["flash_attn"], b_off["decode_tokens_per_s"], b_off["ttft_ms"]) == (4, False, 1200.0, 160.0)
    assert b_on["tokens_per_s"] == 601.0 and b_on["runs"] == [1201.0, 1801.0, 1001.0]


def test_llamacpp_rows_take_the_faster_path():
    """prefer_faster: at each batch-1 point llama-bench's figures (the faster flash-attention setting)
    replace the binding's only where they are faster, per-token and TTFT apart; the footprint is the lower
    of the two paths' peak RSS whichever is faster (it followed the first decode point's path: the edge bar's
    verdict then flipped with per-token noise)."""
    bench = {"pp": [{"prompt_len": 32, "flash_attn": False, "ms": 20.0, "tokens_per_s": 1600.0},
                    {"prompt_len": 32, "flash_attn": True, "ms": 25.0, "tokens_per_s": 1280.0}],
             "tg": [{"depth": 32, "new_tokens": 64, "flash_attn": False, "ms_per_token": 6.0, "tokens_per_s": 166.7},
                    {"depth": 32, "new_tokens": 64, "flash_attn": True, "ms_per_token": 5.0, "tokens_per_s": 200.0},
                    {"depth": 500, "new_tokens": 16, "flash_attn": False, "ms_per_token": 7.0, "tokens_per_s": 140.0},
                    {"depth": 500, "new_tokens": 16, "flash_attn": True, "ms_per_token": 9.0, "tokens_per_s": 111.1}],
             "batched": [{"batch": 8, "prompt_len": 32, "new_tokens": 64, "flash_attn": fa, "tokens_per_s": tps / 2,
                          "decode_tokens_per_s": tps, "ttft_ms": 80.0} for fa, tps in ((False, 400.0), (True, 320.0))],
             "peak_rss_mb": 150.0}  # each point with flash attention off and on: the faster of the two counts

    def case(binding_ms, binding_ttft=30.0, binding_rss=190.0):
        systems = [{"name": "llama.cpp Q8_0 cpu", "kind": "llamacpp", "weights_bytes_per_token": 1e8, "footprint_mb": binding_rss}]
        row = lambda sc, p, n, ms, ttft: {"system": "llama.cpp Q8_0 cpu", "scenario": sc, "batch": 1, "prompt_len": p,  # noqa: E731
                                          "new_tokens": n, "p50_ms": ms, "p90_ms": ms, "ttft_ms": ttft, "total_s": 1.0}
        summary = [row("decode", 32, 64, binding_ms, binding_ttft), row("decode", 128, 64, binding_ms, 60.0),
                   row("context", 500, 16, 8.0, 90.0), {**row("throughput", 32, 64, 1.0, 9.0), "batch": 4}]
        llamacpp.prefer_faster(systems, summary, {"llama.cpp Q8_0 cpu": bench}, bandwidth_gbs=20.0)
        return systems[0], summary

    x, (row, other, ctx, thr, batched) = case(binding_ms=8.0)
    assert x["llamacpp_path"]["used"] == "llama-bench" and x["footprint_mb"] == 150.0
    assert row["p50_ms"] == row["p90_ms"] == 5.0 and row["ttft_ms"] == 20.0 and row["source"] == row["ttft_source"] == "llama-bench"
    assert row["total_s"] == pytest.approx((20.0 + 63 * 5.0) / 1e3) and row["tokens_per_s"] == pytest.approx(64 / row["total_s"])
    assert row["bandwidth_fraction"] == pytest.approx(1e8 / 5e-3 / 1e9 / 20.0)
    assert other["p50_ms"] == 8.0 and "source" not in other  # llama-bench did not measure prompt 128 here
    assert ctx["p50_ms"] == 7.0 and ctx["source"] == "llama-bench" and ctx["ttft_ms"] == 90.0 and "ttft_source" not in ctx
    assert thr["p50_ms"] == 1.0 and "source" not in thr  # batch > 1: the binding does not run it, llama-bench neither
    # llama-batched-bench's batch, appended: the faster flash-attention setting
    assert (batched["scenario"], batched["batch"], batched["source"], batched["flash_attn"]) == ("throughput", 8, "llama-batched-bench", False)
    assert batched["decode_tokens_per_s"] == 400.0 and batched["p50_ms"] == pytest.approx(1e3 * 8 / 400.0)
    assert batched["total_s"] == pytest.approx(8 * 64 / 200.0)
    assert [(p["scenario"], p["binding_ms"], p["llama_bench_ms"], p["llama_bench_ttft_ms"]) for p in x["llamacpp_path"]["points"]] == [
        ("decode", 8.0, 5.0, 20.0), ("context", 8.0, 7.0, None)]
    from gpt2onnx.benchmarks import report

    table = report._llamacpp_points([x])  # the faster of each pair in bold, "—" where llama-bench did not measure
    assert "| llama.cpp Q8_0 cpu | decode: prompt 32, 64 new | 8.00 | **5.00 (FA on)** | 30.0 | **20.0 (FA off)** |" in table
    assert "| llama.cpp Q8_0 cpu | context: prompt 500, 16 new | 8.00 | **7.00 (FA off)** | — | — |" in table
    x, (row, _, ctx, _, _) = case(binding_ms=4.0, binding_ttft=10.0)
    assert x["llamacpp_path"]["used"] == "llama-cpp-python" and row["p50_ms"] == 4.0 and x["footprint_mb"] == 150.0
    assert "Peak RSS (the memory table and the edge bar) the lower of the two, llama-bench's (llama-bench 150 MB, the binding 190 MB)" in "\n".join(report._llamacpp_paths([x]))
    assert case(binding_ms=4.0, binding_rss=140.0)[0]["footprint_mb"] == 140.0  # the binding's where it is the lower
    assert "source" not in row and "ttft_source" not in row and row["total_s"] == 1.0
    assert ctx["source"] == "llama-bench"  # each point on its own
    x, (row, *_) = case(binding_ms=4.0, binding_ttft=40.0)
    assert row["p50_ms"] == 4.0 and row["ttft_ms"] == 20.0 and row["ttft_source"] == "llama-bench" and "source" not in row
    assert row["total_s"] == pytest.approx((20.0 + 63 * 4.0) / 1e3)


def _edge_results(ours_int4_ms: float, ours_int8_ms: float, shape: list[int]) -> dict:
    """A results dict with our int8/int4 and llama.cpp's Q8_0/Q4_0 rows: the figures the edge bars read."""
    def sysrec(name, kind, precision, footprint, size_mb):
        return {"name": name, "kind": kind, "precision": precision, "footprint_mb": footprint,
                "size_bytes": size_mb * 1e6, **({"shape": shape} if kind == "ours" else {})}

    def row(name, ms):
        return {"system": name, "scenario": "decode", "batch": 1, "prompt_len": 32, "p50_ms": ms}

    return {"settings": {"prompt_len": [32], "new_tokens": 64},
            "systems": [sysrec("ours int8 cpu", "ours", "int8", 200, 136), sysrec("ours int4 cpu", "ours", "int4", 230, 76),
                        sysrec("llama.cpp Q8_0 cpu", "llamacpp", "int8", 173, 136), sysrec("llama.cpp Q4_0 cpu", "llamacpp", "int4", 168, 85)],
            "summary": [row("ours int8 cpu", ours_int8_ms), row("ours int4 cpu", ours_int4_ms),
                        row("llama.cpp Q8_0 cpu", 4.0), row("llama.cpp Q4_0 cpu", 4.0)]}


def test_edge_bars_state_each_ratio_and_verdict():
    from gpt2onnx.benchmarks.report import _edge_section

    lines = _edge_section(_edge_results(ours_int4_ms=2.0, ours_int8_ms=4.0, shape=[12, 768]))
    text = "\n".join(lines)
    assert "- **ours int4 cpu, per token**: 2.00 ÷ llama.cpp Q4_0 cpu 4.00 ms = **0.50×** (target ≤ 0.9: met)." in text
    assert "- **ours int8 cpu, per token**: 4.00 ÷ llama.cpp Q8_0 cpu 4.00 ms = **1.00×** (target ≤ 0.9: **not met**)." in text
    assert "- **ours int8 cpu, peak RSS**: 200 ÷ llama.cpp Q8_0 cpu 173 MB = **1.16×** (target ≤ 1.2: met)." in text
    assert "- **ours int4 cpu, peak RSS**: 230 ÷ llama.cpp Q4_0 cpu 168 MB = **1.37×** (target ≤ 1.2: **not met**)." in text
    assert "- **ours int4 cpu, artifact size**: **76 MB** (llama.cpp 85 MB; target ≤ 100: met)." in text
    assert "ours int8 cpu, artifact size**: **136 MB** (llama.cpp 136 MB; target ≤ 150: met)" in text
    # the size bars belong to DialoGPT-small's shape; another model gets the ratios only, and no llama.cpp row, no section
    medium = "\n".join(_edge_section(_edge_results(2.0, 4.0, shape=[24, 1024])))
    assert "per token" in medium and "artifact size" not in medium
    no_anchor = _edge_results(2.0, 4.0, [12, 768])
    no_anchor["systems"] = [x for x in no_anchor["systems"] if x["kind"] == "ours"]
    assert _edge_section(no_anchor) == []


def test_profile_counts_decode_steps_and_weight_bytes(tiny_artifact):
    """benchmarks/profile.py: only the decode steps of the profiled generation, and the weight bytes
    each step reads equal to the MatMul weights of the stored graph (the embeddings' Gathers read a row)."""
    import onnx

    from gpt2onnx.benchmarks import profile

    p = profile.profile(tiny_artifact, prompt_len=8, new_tokens=6)
    assert p["steps"] == 5  # 6 new tokens: the prompt pass gives the first, 5 decode steps the rest
    model = onnx.load(os.path.join(tiny_artifact, "model.onnx"), load_external_data=False)
    size = {t.name: int(np.prod(t.dims)) * 4 for t in model.graph.initializer}
    matmul = sum(size.get(i, 0) for n in model.graph.node if n.op_type == "MatMul" for i in n.input)
    ops = {o["op"]: o for o in p["ops"]}
    assert ops["MatMul"]["weights_mb_per_step"] == pytest.approx(matmul / 1e6)
    assert ops["MatMul"]["nodes"] == sum(n.op_type == "MatMul" for n in model.graph.node)
    assert ops["Gather"]["weights_mb_per_step"] == 0
    assert p["kernels_ms"] == pytest.approx(sum(o["ms_per_step"] for o in p["ops"])) and 0 < p["kernels_ms"] < 2 * p["step_ms_p50"]
    assert p["floor_ms"] == pytest.approx(p["weights_mb_per_step"] / p["read_bandwidth_gbs"])
    assert "| MatMul |" in profile.render(p) and "batch 1," in profile.render(p)
    # --batch: rows decoded together; the same steps, the same weights read once per step whatever the batch
    b = profile.profile(tiny_artifact, prompt_len=8, new_tokens=6, batch=3)
    assert b["batch"] == 3 and b["steps"] == 5 and "batch 3," in profile.render(b)
    assert {o["op"]: o for o in b["ops"]}["MatMul"]["weights_mb_per_step"] == pytest.approx(matmul / 1e6)



def test_profile_prompt_counts_every_pass_of_the_prompt(tmp_path_factory, tiny_artifact, monkeypatch):
    """profile --prompt: the profiled prompt's passes only, all of them (one over a float cache; over an int8
    cache a long prompt runs in INT8_KV_PASS pieces), the figures per prompt: weights read once a pass."""
    import onnx

    from gpt2onnx.benchmarks import profile
    from gpt2onnx.export.convert import ExportOptions, export
    from gpt2onnx.runtime import decoder as decoder_mod

    from .conftest import QUIET

    p = profile.profile(tiny_artifact, prompt_len=40, prompt=True)
    model = onnx.load(os.path.join(tiny_artifact, "model.onnx"), load_external_data=False)
    size = {t.name: int(np.prod(t.dims)) * 4 for t in model.graph.initializer}
    matmul = sum(size.get(i, 0) for n in model.graph.node if n.op_type == "MatMul" for i in n.input)
    ops = {o["op"]: o for o in p["ops"]}
    assert p["mode"] == "prompt" and p["steps"] == 1 and ops["MatMul"]["weights_mb_per_step"] == pytest.approx(matmul / 1e6)
    assert 0 < p["kernels_ms"] <= p["step_ms_p50"]
    assert "a 40-token prompt" in profile.render(p) and "ms/prompt" in profile.render(p)
    int4 = export(ExportOptions("synthetic:tiny", str(tmp_path_factory.mktemp("prof") / "int4"), precision="int4"), log=QUIET)
    monkeypatch.setattr(decoder_mod, "INT8_KV_PASS", 16)
    q = profile.profile(int4, prompt_len=40, prompt=True)  # 16 + 16 + 8
    assert q["steps"] == 3
    d = profile.profile(int4, prompt_len=40, new_tokens=6)  # decode mode: the 5 steps, none of the 3 prompt passes
    assert d["steps"] == 5 and d["mode"] == "decode"
    one = {o["op"]: o["weights_mb_per_step"] for o in profile.profile(int4, prompt_len=8, prompt=True)["ops"]}
    assert {o["op"]: o["weights_mb_per_step"] for o in q["ops"]}["MatMulNBits"] == pytest.approx(3 * one["MatMulNBits"])

# the cheapest bench: every optional scenario off, so a refusal that comes late shows as a run, not a wait
CHEAP = ["--baselines", "", "--no-footprint", "--concurrent-clients", "0", "--chat-turns", "0", "--beams", "0",
         "--repeats", "1", "--new-tokens", "2", "--batch", "1", "--prompt-len", "8", "--context", ""]


def _bench_refusal(capsys, *args: str) -> str:
    """`gpt2onnx bench` in this process, refused: exit status 2 and one error line on stderr, returned."""
    from gpt2onnx import cli

    assert cli.main(["bench", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt2onnx: error: "), lines
    return lines[0]


def test_bench_refuses_a_first_prompt_that_cannot_fit(tiny_artifact, tmp_path, capsys):
    """200 + 2 tokens in synthetic:tiny's 128 positions: refused before any system loads, not a worker's ContextOverflow."""
    err = _bench_refusal(capsys, tiny_artifact, *CHEAP, "--prompt-len", "200", "--out", str(tmp_path / "r"))
    assert "--prompt-len 200 plus --new-tokens 2 exceed the 128-position context" in err and "at most 126" in err
    assert not (tmp_path / "r").exists()


def test_bench_drops_prompts_that_cannot_fit():
    """The defaults on a 256-position model (trained:chat): 512 + 64 is dropped and said, 32 and 128 stay."""
    said = []
    p = plan.scenarios(settings.Settings(artifacts=[], concurrent_clients=[0]), 256, log=said.append)
    assert [x[2] for x in p.points if x[0] == "decode"] == [32, 128]
    assert {x[2] for x in p.points if x[0] == "throughput"} == {32}
    assert any("prompts of 512 tokens" in m and "256-position" in m for m in said), said


@pytest.mark.parametrize("args, needle", [
    (["--threads", "-1"], "--threads must be 0 (one per core) to 1024, got -1"),
    (["--threads", "5000"], "--threads must be 0 (one per core) to 1024, got 5000"),
    (["--beams", "-1"], "--beams must be 0 (skip the beam scenario) or 2 to 16, got -1"),
    (["--beams", "1"], "--beams must be 0"),
    (["--cache", "{file}"], "is a file; give a directory for the baselines"),
])
def test_bench_refuses_settings_a_worker_would_refuse_late(tiny_artifact, tmp_path, capsys, args, needle):
    """Refused before any system loads: --threads was a worker's 'internal error', --beams a refusal after the
    whole run, a --cache that is a file a NotADirectoryError while saving a baseline."""
    (tmp_path / "f").write_text("x")
    err = _bench_refusal(capsys, tiny_artifact, *CHEAP, *[a.format(file=tmp_path / "f") for a in args], "--out", str(tmp_path / "r"))
    assert needle in err and not (tmp_path / "r").exists(), err


def test_bench_says_which_context_points_it_drops():
    said = []
    p = plan.scenarios(settings.Settings(artifacts=[], concurrent_clients=[0], context=[50, 200, 300]), 256, log=said.append)
    assert [x[2] for x in p.points if x[0] == "context"] == [50, 200]
    assert any(m.startswith("context scenario: 300 tokens plus 16 new tokens do not fit the 256-position") for m in said), said


def test_bench_refuses_an_out_that_is_a_file(tiny_artifact, tmp_path, capsys):
    """Refused before measuring, not a FileExistsError after the whole run."""
    f = tmp_path / "f"
    f.write_text("x")
    assert "--out " + str(f) + " is a file" in _bench_refusal(capsys, tiny_artifact, *CHEAP, "--out", str(f))
    assert "is not a directory" in _bench_refusal(capsys, tiny_artifact, *CHEAP, "--out", str(f / "sub"))
    assert f.read_text() == "x"


def test_bench_takes_each_artifact_once_and_of_one_model(tiny_artifact, tiny_mixed_artifact, tmp_path, capsys):
    """The same artifact twice measured it twice under one name; two artifacts of one precision pooled their
    records into one row; an artifact of another model met the first one's PyTorch baseline."""
    from types import SimpleNamespace

    from gpt2onnx.runtime.artifact import load_manifest

    again = str(tmp_path / "again")
    os.symlink(tiny_artifact, again)
    err = _bench_refusal(capsys, tiny_artifact, again, *CHEAP, "--out", str(tmp_path / "r"))
    assert f"artifact {again} is given twice; give each artifact once" in err and not (tmp_path / "r").exists()
    both = [load_manifest(a) for a in (tiny_artifact, tiny_mixed_artifact)]
    specs, _ = plan.systems(settings.Settings(artifacts=[], baselines=[]), both, log=QUIET)
    assert [x.name for x in specs] == [f"ours fp32 cpu ({os.path.basename(a)})" for a in (tiny_artifact, tiny_mixed_artifact)]
    plan.check_artifacts(both)  # one checkpoint: fine
    other = SimpleNamespace(path="/x/medium", raw={"source": {"checkpoint": "synthetic:dialogpt-medium", "synthetic": True, "seed": 0}})
    with pytest.raises(Gpt2OnnxError, match="was exported from synthetic:dialogpt-medium .seed 0., .* from synthetic:tiny .seed 0.: "
                       "the baselines run one model; bench the artifacts of one checkpoint per run"):
        plan.check_artifacts([both[0], other])


def test_bench_refuses_an_unavailable_provider(tiny_artifact, tmp_path, capsys, monkeypatch):
    """cuda where onnxruntime has no CUDA provider (made so here, whatever this machine has): refused first."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    err = _bench_refusal(capsys, tiny_artifact, *CHEAP, "--bench-provider", "cuda", "--out", str(tmp_path / "r"))
    assert "--bench-provider cuda is not available" in err and "--bench-provider cpu" in err
    assert not (tmp_path / "r").exists()


def test_ab_passes_load_options_to_one_side(tiny_artifact):
    """benchmarks/ab.py --new-load: Engine.load options reach the new side's processes only (an unknown one
    fails there, named); the same checkout and artifact on both sides then compare one load option."""
    root = str(Path(__file__).resolve().parents[1])

    def ab(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.ab", root, "--base-art", tiny_artifact,
                               "--new-art", tiny_artifact, "--modes", "b1", "--repeats", "1", *extra],
                              capture_output=True, text=True, timeout=300)

    bad = ab("--new-load", '{"no_such_option": 1}')
    assert bad.returncode != 0 and "new b1" in bad.stderr and "no_such_option" in bad.stderr
    ok = ab("--new-load", '{"huge_pages": false}')
    assert ok.returncode == 0, ok.stderr
    assert [ln.split()[:3] for ln in ok.stdout.splitlines()] == [["b1", "tiny", "ms_per_token"], ["b1", "tiny", "ttft_ms"]]
    refused = ab("--base-load", "[1]")
    assert refused.returncode == 2 and "--base-load takes a JSON object of Engine.load options" in refused.stderr


def test_ab_refuses_what_would_compare_a_checkout_with_itself(tiny_artifact, tmp_path):
    """A base that is no checkout once built dangling links and measured the installed package on both
    sides (ratios of 1, exit 0); relative artifact paths failed in the children's temporary directory."""
    root = str(Path(__file__).resolve().parents[1])
    art = os.path.basename(tiny_artifact)

    def ab(base: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpt2onnx.benchmarks.ab", base, "--base-art", art, "--new-art", art,
                               *extra], capture_output=True, text=True, timeout=300, cwd=os.path.dirname(tiny_artifact))

    for base, extra, needle in [(str(tmp_path), [], "is not a gpt2onnx checkout (no gpt2onnx/__init__.py)"),
                                (root, ["--modes", "b2"], "--modes takes a comma-separated choice of b1, b16, c16"),
                                (root, ["--repeats", "0"], "--repeats must be at least 1")]:
        r = ab(base, *extra)
        assert r.returncode == 2 and needle in r.stderr and not r.stdout, r.stderr
    ok = ab(root, "--modes", "b1", "--repeats", "1")  # relative artifact paths, from where they are
    assert ok.returncode == 0 and ok.stdout.startswith("b1   tiny"), ok.stderr


def test_ctrl_c_ends_a_bench_in_one_line(tiny_artifact, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: the workers printed a KeyboardInterrupt
    traceback each beside the parent's "interrupted". Now they ignore it and the parent alone answers."""
    import signal
    import time

    out = tmp_path / "report"
    p = subprocess.Popen([sys.executable, "-m", "gpt2onnx", "bench", tiny_artifact, "--baselines", "pytorch", "--out", str(out),
                          "--repeats", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal starts it
    lines, deadline = [], time.time() + 180
    try:
        for line in p.stdout:  # until the workers are loaded and measuring
            lines.append(line)
            if line.startswith("warm-up") or time.time() > deadline:
                break
        os.killpg(p.pid, signal.SIGINT)
        rest = p.communicate(timeout=60)[0]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert any(ln.startswith("warm-up") for ln in lines), text
    assert p.returncode == 130 and "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert text.rstrip().endswith("gpt2onnx: interrupted") and not out.exists(), text


@pytest.mark.parametrize("module, args, needle", [
    ("report", [], "the following arguments are required: dir"),
    ("report", ["{tmp}"], "holds no results.json"),
    ("app_rounds", ["{art}", "--rounds", "0"], "--rounds must be at least 1, got 0"),
    ("app_rounds", ["{tmp}/missing"], "does not exist"),
    ("profile", ["{art}", "--prompt-len", "-2"], "--prompt-len must be at least 1, got -2"),
    ("profile", ["{art}", "--json", "{tmp}"], "--json {tmp} cannot be written"),
    ("profile", ["{tmp}/missing"], "does not exist"),
    ("accuracy", ["trained:chat", "--limit", "0"], "--limit must be at least 1, got 0"),
    ("accuracy", ["synthetic:tiny"], "accuracy is measured on trained weights"),
    ("beam_speed", ["{art}", "--beams", "0"], "--beams takes comma-separated beam counts from 1 to 16"),
    ("beam_speed", ["{tmp}/missing"], "does not exist"),
    ("memory", ["{tmp}/missing"], "does not exist"),
    ("memory", ["{art}", "--out", "{tmp}"], "--out {tmp} cannot be written"),
    ("gpu_check", ["{art}", "--provider", "cpu", "--out", "{tmp}/file"], "--out {tmp}/file is a file"),
    ("gpu_step", ["{art}", "--provider", "cpu", "--out", "{tmp}/file"], "--out {tmp}/file is a file"),
    ("gpu_kernels", ["{art}", "--provider", "cpu", "--out", "{tmp}/file"], "--out {tmp}/file is a file"),
    ("quant_sweep", ["--configs", "-1", "--out", "{tmp}/q.json"], "--configs takes comma-separated indices from 0 to"),
    ("quant_sweep", ["--out", "{tmp}"], "--out {tmp} cannot be written"),
])
def test_benchmark_tools_refuse_bad_input_in_one_line(tiny_artifact, tmp_path, module, args, needle):
    """The tools the README names (python -m gpt2onnx.benchmarks.X) refuse as the CLI does, before measuring:
    they printed tracebacks (report took --help for a directory), looped on --limit -1, or failed after the run."""
    (tmp_path / "file").write_text("x")
    r = subprocess.run([sys.executable, "-m", f"gpt2onnx.benchmarks.{module}",
                        *[a.format(art=tiny_artifact, tmp=tmp_path) for a in args]], capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"python -m gpt2onnx.benchmarks.{module}: error: ") and needle.format(tmp=tmp_path) in lines[0], r.stderr


def test_a_workers_warning_reads_as_the_cli_s(tmp_path):
    """The fp16-on-CPU warning, raised in a worker (a spawned interpreter), printed as Python's UserWarning
    with its file, line and source; the CLI prints it as one 'gpt2onnx: warning:' line."""
    art = tmp_path / "fp16"
    assert run_cli("export", "synthetic:tiny", "-o", str(art), "--precision", "fp16").returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    r = subprocess.run([sys.executable, "-m", "gpt2onnx", "bench", str(art), *CHEAP, "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=300, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "gpt2onnx: warning: fp16 on the CPU provider is no faster" in out, out
    assert "UserWarning" not in out, out
