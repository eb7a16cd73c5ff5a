"""The benchmark harness on synthetic:tiny: schema, report files, a missing baseline, a damaged artifact."""

from __future__ import annotations

import csv
import json
import os
import shutil

from gpt2onnx.benchmarks import harness

from .conftest import run_cli
from .test_cli import assert_one_line_error

SMALL = dict(batch=[1, 2], prompt_len=[8, 16], new_tokens=4, repeats=2, context=[16, 64, 126], context_new_tokens=4,
             chat_turns=3, chat_user_len=6, chat_reply_len=4)


def test_bench_schema_and_report(tmp_path, tiny_artifact, monkeypatch):
    real = harness.baseline_missing
    monkeypatch.setattr(harness, "baseline_missing", lambda k: "optimum-onnx is not installed (test)" if k == "optimum" else real(k))
    s = harness.Settings(artifacts=[tiny_artifact], baselines=["pytorch", "optimum"], out=str(tmp_path / "rep"),
                         cache=str(tmp_path / "cache"), **SMALL)
    res = harness.run(s, log=lambda m: None)
    out = tmp_path / "rep"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema_version"] == harness.SCHEMA_VERSION == res["schema_version"]
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
    assert ours["accuracy"]["decode_vs_pytorch_fp32"]["max_abs_logit_diff"] < 1e-4
    summary = [r for r in on_disk["summary"] if r["system"] == ours["name"] and r["scenario"] == "decode"]
    assert len(summary) == 2 and all(0 < r["bandwidth_fraction"] for r in summary)
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(on_disk["records"])
    report = (out / "report.md").read_text()
    assert "| ours fp32 cpu |" in report and "| pytorch fp32 cpu |" in report and "× pytorch fp32 cpu" in report
    assert "Skipped baseline **optimum**" in report
    assert "## Chat: time to first token per turn" in report and "| 7 | 19 | 31 |" in report
    for png in ("latency_vs_context.png", "throughput_vs_batch.png", "precisions.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_with_optimum(tmp_path, tiny_artifact):
    r = run_cli("bench", tiny_artifact, "--baselines", "optimum", "--batch", "1", "--prompt-len", "8", "--new-tokens", "3",
                "--repeats", "1", "--context", "16", "--context-new-tokens", "3", "--chat-turns", "2", "--out", str(tmp_path / "rep"),
                "--cache", str(tmp_path / "cache"), timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [x["kind"] for x in res["systems"]] == ["ours", "optimum"]
    assert os.path.isfile(tmp_path / "cache" / "optimum-hf-tiny-seed0" / "model.onnx")


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
