"""From timings to figures: one record per measurement run, the concurrent scenario's figures from
per-request stamps, and the summary (medians over repeats, achieved bandwidth)."""

from __future__ import annotations

import numpy as np

from gpt2onnx.runtime.errors import Gpt2OnnxError

from .report import floor_bandwidth

FIGURES = ("ttft_ms", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "total_s", "tokens_per_s", "decode_tokens_per_s")
CONCURRENT_FIGURES = ("wall_s", "requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
                      "max_stall_ms")


def record(system: str, scenario: str, rep: int, batch: int, plen: int, new: int, r: dict) -> dict:
    """A record of one `generate` or chat turn from its timings (the worker's answer `r`)."""
    steps = np.array(r["step_s"]) * 1e3
    return {
        "system": system, "scenario": scenario, "repeat": rep, "batch": batch, "prompt_len": plen, "new_tokens": new,
        "ttft_ms": r["ttft_s"] * 1e3,
        "p50_ms": float(np.percentile(steps, 50)), "p90_ms": float(np.percentile(steps, 90)),
        "p99_ms": float(np.percentile(steps, 99)), "mean_ms": float(steps.mean()),
        "total_s": r["total_s"], "tokens_per_s": batch * new / r["total_s"],
        "decode_tokens_per_s": batch * len(steps) / (steps.sum() / 1e3),
        **({"cached_tokens": r["cached_tokens"]} if "cached_tokens" in r else {}),
    }


def concurrent_figures(requests: list[dict]) -> dict:
    """The concurrent scenario's figures from per-request timing records {submitted_s, token_s}
    (perf_counter seconds), whichever system and mode produced them.

    Raises:
        Gpt2OnnxError: a request without tokens, or stamps out of order (a first token before its
            submission, a token not after the one before, beyond the record's `released_late`).
    """
    ttft = np.array([r["token_s"][0] - r["submitted_s"] if r["token_s"] else -1.0 for r in requests])
    gaps = np.concatenate([np.diff(r["token_s"]) for r in requests])
    # a token may share its stamp with the next only where the server released them in one chunk
    # (llama-server holds back a token that ends mid-way through a UTF-8 character: released_late)
    bad = [(np.diff(r["token_s"]) < 0).any() or ((np.diff(r["token_s"]) == 0).sum() > r.get("released_late", 0)) for r in requests]
    if (ttft < 0).any() or any(bad):
        raise Gpt2OnnxError("concurrent timing records out of order: a first token before its submission or a token "
                            "not after the one before")
    wall = max(r["token_s"][-1] for r in requests) - min(r["submitted_s"] for r in requests)
    tokens = sum(len(r["token_s"]) for r in requests)
    ttft, gaps = ttft * 1e3, gaps * 1e3
    return {"requests": len(requests), "tokens": tokens, "wall_s": wall, "requests_per_s": len(requests) / wall,
            "tokens_per_s": tokens / wall,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "itl_p50_ms": float(np.percentile(gaps, 50)), "itl_p99_ms": float(np.percentile(gaps, 99)),
            "max_stall_ms": float(gaps.max())}


def concurrent_record(system: str, mode: str, rep: int, clients: int, max_batch: int, requests: list[dict]) -> dict:
    return {"system": system, "scenario": "concurrent", "mode": mode, "repeat": rep, "clients": clients,
            "max_batch": max_batch, **concurrent_figures(requests)}


def summarize(records: list[dict], systems: list[dict], machine: dict, provider: str) -> list[dict]:
    """Median over repeats per (system, scenario, batch, prompt_len), with achieved bandwidth as a
    fraction of the bandwidth report.floor_bandwidth picks for `provider`; concurrent records per
    (system, mode, clients)."""
    conc: dict[tuple, list[dict]] = {}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["scenario"] == "concurrent":
            conc.setdefault((r["system"], r["mode"], r["clients"]), []).append(r)
            continue
        groups.setdefault((r["system"], r["scenario"], r["batch"], r["prompt_len"]), []).append(r)
    by_name = {s["name"]: s for s in systems}
    _, bw_gbs = floor_bandwidth(machine, provider)
    out = []
    for (system, scenario, batch, plen), rs in groups.items():
        row = {"system": system, "scenario": scenario, "batch": batch, "prompt_len": plen,
               "new_tokens": rs[0]["new_tokens"], "repeats": len(rs)}
        row.update({f: float(np.median([r[f] for r in rs])) for f in FIGURES})
        if "cached_tokens" in rs[0]:
            row["cached_tokens"] = int(np.median([r["cached_tokens"] for r in rs]))
        wb = by_name[system].get("weights_bytes_per_token")
        row["achieved_gbs"] = wb / (row["p50_ms"] / 1e3) / 1e9 if wb else None
        row["bandwidth_fraction"] = row["achieved_gbs"] / bw_gbs if wb else None
        out.append(row)
    for (system, mode, clients), rs in conc.items():
        row = {"system": system, "scenario": "concurrent", "mode": mode, "clients": clients, "max_batch": rs[0]["max_batch"],
               "requests": rs[0]["requests"], "tokens": rs[0]["tokens"], "repeats": len(rs)}
        row.update({f: float(np.median([r[f] for r in rs])) for f in CONCURRENT_FIGURES})
        out.append(row)
    return out

