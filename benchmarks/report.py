"""report.md and PNG plots from a results dict (see results.py for the schema)."""

from __future__ import annotations

import os


def _fmt(v, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def _lookup(summary, system, scenario, batch, plen):
    return next((r for r in summary if r["system"] == system and r["scenario"] == scenario
                 and r["batch"] == batch and r["prompt_len"] == plen), None)


def _batch1(summary, system, plen):
    return _lookup(summary, system, "decode", 1, plen)


# The baselines compared at each precision of ours (benchmarks/engines/llamacpp.py, engines/ctranslate2.py,
# engines/optimum.py: fp32, and int8 on a CPU), and their column titles.
ANCHORS = {"llamacpp": "llama.cpp", "ctranslate2": "CTranslate2", "optimum": "optimum"}
# The baselines every row gets a ratio column against (they run the checkpoint, not a conversion of it).
RATIO_BASELINES = ("pytorch", "pytorch-compile")
# The bandwidth a batch-1 decode's floor divides by: its column title and how the text names it.
BANDWIDTHS = {"read": ("read bw", "the measured read bandwidth"),
              "device_copy": ("GPU bw", "the GPU's memory bandwidth (a device-to-device copy measured in this run)")}


def floor_bandwidth(machine: dict, provider: str) -> tuple[str, float]:
    """(key into BANDWIDTHS, GB/s) that the floor and the achieved-bandwidth figures are measured against:
    on CUDA the GPU's device-to-device copy when the run measured one, else the host's read bandwidth
    (which bounds a CPU decode, not a GPU's: the report then says the GPU figure is missing)."""
    bw = machine["memory_bandwidth_gbs"]
    if provider == "cuda" and bw.get("device_copy"):
        return "device_copy", bw["device_copy"]
    return "read", bw["read"]


def write_report(results: dict, out: str, into: str | None = None) -> None:
    """report.md and the plots of `results`, for the report directory `out` (its accuracy.json and capture.json,
    when there, are read from it), written into `into` (default `out`; results.publish passes its temporary directory)."""
    src, out = out, into or out
    s = results["settings"]
    m = results["machine"]
    summary = results["summary"]
    systems = results["systems"]
    p0 = s["prompt_len"][0]
    baselines = [x for x in systems if x["kind"] in RATIO_BASELINES]  # a ratio column each
    anchors = [k for k in ANCHORS if any(x["kind"] == k for x in systems)]  # a column each: the same precision
    bw = m["memory_bandwidth_gbs"]
    bw_key, bw_gbs = floor_bandwidth(m, s["provider"])
    bw_col, bw_text = BANDWIDTHS[bw_key]
    L = [
        "# gpt2onnx benchmark",
        "",
        f"{results['created']} · {m['cpu']} · {m.get('cores_physical', '?')} physical / {m['cores_logical']} logical cores · "
        f"{_fmt(m.get('memory_gb'), '.0f')} GiB · GPU: {m.get('gpu') or 'none'}",
        f"Measured memory bandwidth: read {bw['read']:.1f} GB/s, copy {bw['copy']:.1f} GB/s"
        + (f", GPU device-to-device copy {bw['device_copy']:.0f} GB/s" if bw.get("device_copy") else "")
        + ". Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        f"Settings: provider {s['provider']}, threads {s['threads'] or 'one per core'}, {s['repeats']} repeats "
        "(medians reported; one warm-up run per point not counted), systems interleaved run by run.",
    ]
    kv = [f"{x['name']} {x['kv_cache']}" for x in systems if x.get("kv_cache")]
    if kv:
        L.append("KV cache dtype: " + ", ".join(kv) + " (each system's own; the cache's bytes read per token grow with the "
                 "context: the context table's slope).")
    if s["provider"] == "cuda" and bw_key != "device_copy":
        L.append(f"GPU memory bandwidth not measured ({m.get('device_bandwidth_error') or 'an older run'}): the floor and "
                 "GB/s columns below use the host's read bandwidth, which does not bound a GPU's decode.")
    for sk in results["skipped"]:
        L.append(f"Skipped baseline **{sk['baseline']}**: {sk['reason']}.")
    L += _llamacpp_paths(systems)
    ratio_cols = [f"× {b['name']}" for b in baselines] + [f"× {ANCHORS[k]} same precision" for k in anchors]
    L += [
        "",
        f"## Batch 1 decode: prompt {p0}, {s['new_tokens']} new tokens",
        "",
        "Ratios are per-token p50 against each baseline (below 1 = faster). Floor = bytes of weights read per "
        f"token / {bw_text}: no batch-1 decode can be faster. Achieved bandwidth = those bytes / p50.",
        *_compiled_note(systems),
        *_optimum_note(systems),
        "",
        "| system | load s | TTFT ms | p50 ms/tok | p90 | p99 | tok/s | peak RSS MB | size MB | weights MB/tok | floor ms/tok | "
        f"GB/s (% of {bw_col}) | max abs Δlogit | top-1 |" + "".join(f" {c} |" for c in ratio_cols),
        "|" + "---|" * (14 + len(ratio_cols)),
    ]
    for x in systems:
        r = _batch1(summary, x["name"], p0)
        if r is None:
            continue
        acc = _accuracy(x)
        ratios = []
        for b in baselines:
            rb = _batch1(summary, b["name"], p0)
            ratios.append(_fmt(r["p50_ms"] / rb["p50_ms"]) if rb else "—")
        for k in anchors:
            a = next((y for y in systems if y["kind"] == k and y["precision"] == x["precision"]), None)
            rb = a and _batch1(summary, a["name"], p0)
            ratios.append(_fmt(r["p50_ms"] / rb["p50_ms"]) if rb else "—")
        wb = x.get("weights_bytes_per_token")
        gbs = f"{r['achieved_gbs']:.1f} ({100 * r['bandwidth_fraction']:.0f}%)" if r.get("achieved_gbs") else "—"
        L.append(
            f"| {x['name']} | {x['load_s']:.2f} | {r['ttft_ms']:.1f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['decode_tokens_per_s']:.1f} | {_fmt(x.get('peak_rss_mb'), '.0f')} | {_fmt(x['size_bytes'] and x['size_bytes'] / 1e6, '.0f')} | "
            f"{_fmt(wb and wb / 1e6, '.0f')} | {_fmt(wb and 1e3 * wb / (bw_gbs * 1e9), '.1f' if bw_key == 'read' else '.2f')} | {gbs} | "
            f"{acc['dlogit']} | {acc['top1']} |" + "".join(f" {c} |" for c in ratios)
        )
    if any(x.get("gpu_peak_mb") or x.get("gpu_used_mb") for x in systems):
        L += ["", "GPU memory: " + ", ".join(f"{x['name']} {_fmt(x.get('gpu_peak_mb') or x.get('gpu_used_mb'), '.0f')} MB" for x in systems)]
    L += _memory(systems)
    L += _edge_section(results)
    L += _gpu_section(results, _capture(src))
    L += _beams(results.get("beams") or {})

    L += ["", "## Time to first token (batch 1), ms", "", "| system | " + " | ".join(f"prompt {p}" for p in s["prompt_len"]) + " |",
          "|" + "---|" * (1 + len(s["prompt_len"]))]
    for x in systems:
        cells = [_fmt((_batch1(summary, x["name"], p) or {}).get("ttft_ms"), ".1f") for p in s["prompt_len"]]
        L.append(f"| {x['name']} | " + " | ".join(cells) + " |")

    batches = sorted(set(s["batch"]) | {1})
    L += ["", f"## Throughput by batch (prompt {p0}, {s['new_tokens']} new tokens), tokens/s end to end (decode only)", "",
          *(_llamacpp_batches(systems, summary)),
          "| system | " + " | ".join(f"batch {b}" for b in batches) + " |", "|" + "---|" * (1 + len(batches))]
    for x in systems:
        cells = []
        for b in batches:
            r = _batch1(summary, x["name"], p0) if b == 1 else _lookup(summary, x["name"], "throughput", b, p0)
            cells.append(f"{r['tokens_per_s']:.0f} ({r['decode_tokens_per_s']:.0f})" if r else "—")
        L.append(f"| {x['name']} | " + " | ".join(cells) + " |")

    ctx = sorted({r["prompt_len"] for r in summary if r["scenario"] == "context"})
    if ctx:
        L += ["", f"## Per-token latency against context length (batch 1, p50 ms over {s['context_new_tokens']} tokens)", "",
              "| system | " + " | ".join(str(c) for c in ctx) + " | last / first |", "|" + "---|" * (2 + len(ctx))]
        for x in systems:
            vals = [(_lookup(summary, x["name"], "context", 1, c) or {}).get("p50_ms") for c in ctx]
            growth = _fmt(vals[-1] / vals[0]) if vals[0] and vals[-1] else "—"
            L.append(f"| {x['name']} | " + " | ".join(_fmt(v) for v in vals) + f" | {growth} |")

    L += _llamacpp_points(systems)

    chat = sorted({r["prompt_len"] for r in summary if r["scenario"] == "chat"})
    if chat:
        L += ["", "## Chat: time to first token per turn as the history grows (batch 1, ms)", "",
              f"A DialoGPT conversation of {len(chat)} turns: user messages of {s['chat_user_len']} tokens + EOS, replies of "
              f"{s['chat_reply_len']} tokens + EOS; columns are the prompt (the whole history) at each turn. Ours keeps the "
              "KV cache between turns (`engine.chat()`, PromptCache), so a turn runs only the tokens the cache lacks; "
              "PyTorch, optimum and CTranslate2 run the whole history each turn, as DialoGPT's usage does; llama.cpp "
              "(llama-cpp-python) keeps its KV cache and runs what follows the longest common prefix.", "",
              "| system | " + " | ".join(str(c) for c in chat) + " | tokens run at the last turn |", "|" + "---|" * (2 + len(chat))]
        for x in systems:
            rows = [_lookup(summary, x["name"], "chat", 1, c) for c in chat]
            if not any(rows):
                continue
            last = rows[-1] or {}
            ran = chat[-1] - last.get("cached_tokens", 0)
            L.append(f"| {x['name']} | " + " | ".join(_fmt((r or {}).get("ttft_ms"), ".1f") for r in rows) + f" | {ran} |")

    if any(r["scenario"] == "concurrent" for r in summary):
        L += _concurrent_section(results)

    trained = _trained_accuracy(src)
    L += _accuracy_section(systems, trained)
    plots = ["latency_vs_context.png", "throughput_vs_batch.png", "precisions.png"]
    plots += ["concurrent.png"] if any(r["scenario"] == "concurrent" for r in summary) else []
    plots += ["accuracy.png"] if trained else []
    L += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots) + ". Raw data: `results.json`, `results.csv`.", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(L))
    _plots(results, out)
    if trained:
        from .accuracy import plot

        plot([trained], os.path.join(out, "accuracy.png"))


def _trained_accuracy(out: str) -> dict | None:
    """The precision table on trained weights, when `python -m gpt2onnx.benchmarks.accuracy --out`
    wrote accuracy.json into this report's directory (`make bench` does)."""
    import json

    path = os.path.join(out, "accuracy.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _accuracy_section(systems: list[dict], trained: dict | None) -> list[str]:
    """One row per model and precision: the trained reference model on its held-out conversations
    (benchmarks/accuracy.py), then each measured artifact's export-time figures from its manifest."""
    ours = [x for x in systems if x["kind"] == "ours" and (x.get("accuracy") or {}).get("teacher_forced")]
    if not ours and not trained:
        return []
    L = ["", "## Accuracy against the PyTorch fp32 model, by precision", ""]
    if trained:
        from .accuracy import table

        tr = trained["training"]
        L += [f"**Trained weights** ({trained['model']}: {tr['settings']['n_layer']} layers x {tr['settings']['n_embd']}, "
              f"trained here, held-out perplexity {tr['heldout_perplexity']:.2f}), on "
              f"{trained['heldout']['conversations']} held-out conversations: teacher-forced through the KV cache, and "
              f"greedy replies of ≤ {trained['heldout']['reply_tokens']} tokens to each opening turn compared token for "
              "token with PyTorch fp32 `generate` (first divergence: the reply token where differing replies first differ).",
              ""]
        L += table(trained["rows"])
        L.append("")
    if ours:
        L += ["**The measured artifacts** (figures from each manifest, taken at export: teacher-forced over the shipped "
              "text). Synthetic checkpoints have seeded random weights whose logits are flat, so top-1 agreement "
              "understates what a trained model shows; the table above is the one to read for quality.", "",
              "| system | precision | perplexity (PyTorch fp32) | Δ perplexity | mean KL | top-1 | decode max abs Δlogit |",
              "|" + "---|" * 7]
        for x in ours:
            tf = x["accuracy"]["teacher_forced"]
            dec = x["accuracy"].get("decode_vs_pytorch_fp32") or {}
            L.append(f"| {x['name']} | {x['precision']} | {tf['perplexity']:.4g} "
                     f"({tf['perplexity_pytorch']:.4g}) | {tf['perplexity_change_pct']:+.2f}% | {tf['mean_kl']:.2e} | "
                     f"{tf['top1_agreement']:.3f} | {_fmt(dec.get('max_abs_logit_diff'), '.1e')} |")
    return L


# The bars the concurrent scenario is held to (stated in the report with the measured values).
BAR_CLIENTS = 16
BAR_SPEEDUP = 4.0  # scheduler tokens/s ÷ serial tokens/s at BAR_CLIENTS, at least
BAR_HTTP_LOSS = 0.15  # issue 10: tokens/s through HTTP within 15% of the in-process scheduler
BAR_ITL = 5.0  # scheduler p99 inter-token latency ÷ the batch-1 p50 per-token time, at most


def _concurrent_section(results: dict) -> list[str]:
    s, summary, systems = results["settings"], results["summary"], results["systems"]
    p0 = s["prompt_len"][0]
    conc = [r for r in summary if r["scenario"] == "concurrent"]
    mix = results.get("concurrent") or {}
    clients = sorted({r["clients"] for r in conc})
    at = lambda system, mode, c: next((r for r in conc if r["system"] == system and r["mode"] == mode and r["clients"] == c), None)  # noqa: E731
    b1 = lambda system: (_batch1(summary, system, p0) or {}).get("p50_ms")  # noqa: E731
    L = ["", "## Concurrent clients", "",
         f"C closed-loop clients each send their next request as soon as their last one is complete. Prompts of "
         f"{_range(mix.get('prompt_len'))} tokens and replies of {_range(mix.get('reply_len'))} tokens (uniform, every reply "
         "exactly its length), the same request list for every system. Modes: **scheduler** = continuous batching "
         "(`Scheduler`, up to the batch shown); **http** = the same scheduler behind `gpt2onnx serve`'s app in the "
         "same process, clients streaming `/v1/completions` over loopback HTTP (each token stamped when its SSE chunk "
         "arrives): the difference from scheduler is what HTTP, JSON and SSE cost; **serial** = one `generate` at a time behind a lock, what a service "
         "without a scheduler does; **static** = when the engine is free, everything waiting (gathered for 5 ms, up to "
         "the batch shown) runs as one `generate` to its longest reply, each row counted done at its own length. "
         "TTFT runs from submission (queue wait included) to the first token; ITL is every gap between consecutive "
         "tokens of a request; max stall is the largest such gap. "
         + "".join(f"**{m}** = the scheduler with `prompt_width` {m[len('chunked'):]}: while rows decode, prompts go in "
                   "right-padded chunks of exactly that many columns, one row per pass (fixed shapes, captured per slot "
                   "under CUDA graphs). " for m in sorted({r["mode"] for r in conc if r["mode"].startswith("chunked")}))
         + "".join(f"**{m}** = the same chunks, one a step running in the decode step's own pass (the artifact's mixed "
                   "step graph, `export --mixed-step`): a decoding row waits one pass, not a step and a chunk pass. "
                   for m in sorted({r["mode"] for r in conc if r["mode"].startswith("mixed")}))
         + ("**server** = llama.cpp's own llama-server: continuous batching, one slot per client (`-np C`), clients "
            "streaming `/completion` over loopback HTTP. " if any(r["mode"] == "server" for r in conc) else "")
         + f"Medians over repeats ({s.get('concurrent_repeats', '?')}, systems interleaved).", ""]
    c_bar = BAR_CLIENTS if BAR_CLIENTS in clients else clients[-1]
    for x in systems:
        sched = [at(x["name"], "scheduler", c) for c in clients]
        if not any(sched):
            continue
        r, ser, ref = at(x["name"], "scheduler", c_bar), at(x["name"], "serial", c_bar), b1(x["name"])
        if r and ser:
            v = r["tokens_per_s"] / ser["tokens_per_s"]
            L.append(f"- **{x['name']}, bar 1** (C={c_bar}): scheduler {r['tokens_per_s']:.0f} tok/s ÷ serial "
                     f"{ser['tokens_per_s']:.0f} tok/s = **{v:.2f}×** (target ≥ {BAR_SPEEDUP:g}: {_met(v >= BAR_SPEEDUP)}).")
        http = at(x["name"], "http", c_bar)
        if r and http:
            v = http["tokens_per_s"] / r["tokens_per_s"]
            L.append(f"- **{x['name']}, through HTTP** (C={c_bar}): {http['tokens_per_s']:.0f} tok/s = **{v:.2f}×** the "
                     f"in-process scheduler (target ≥ {1 - BAR_HTTP_LOSS:g}: {_met(v >= 1 - BAR_HTTP_LOSS)}); TTFT p99 "
                     f"{http['ttft_p99_ms']:.0f} ms, inter-token p99 {http['itl_p99_ms']:.1f} ms.")
        if r and ref:
            v = r["itl_p99_ms"] / ref
            bar = GPU_ITL if x.get("provider") == "CUDAExecutionProvider" else BAR_ITL  # the GPU bars' own, on CUDA
            worst = max((q for q in sched if q), key=lambda q: q["itl_p99_ms"])
            L.append(f"- **{x['name']}, bar 2** (C={c_bar}): scheduler p99 inter-token latency {r['itl_p99_ms']:.1f} ms ÷ "
                     f"batch-1 p50 per-token {ref:.2f} ms (decode scenario, prompt {p0}) = **{v:.2f}×** (target ≤ {bar:g}: "
                     f"{_met(v <= bar)}; worst over C: {worst['itl_p99_ms'] / ref:.2f}× at C={worst['clients']}).")
    for c in clients:
        rows = [r for r in conc if r["clients"] == c]
        L += ["", f"### {c} client{'s' if c > 1 else ''}: {rows[0]['requests']} requests, {rows[0]['tokens']} tokens, "
                  f"batch ≤ {rows[0]['max_batch']}", "",
              "| system | mode | req/s | tok/s | × serial tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
              "ITL p99 ÷ batch-1 p50 | max stall ms |", "|" + "---|" * 11]
        for r in rows:
            ser, ref = at(r["system"], "serial", c), b1(r["system"])
            L.append(f"| {r['system']} | {r['mode']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{_fmt(ser and r['tokens_per_s'] / ser['tokens_per_s'])} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
                     f"{r['itl_p50_ms']:.2f} | {r['itl_p99_ms']:.2f} | {_fmt(ref and r['itl_p99_ms'] / ref)} | {r['max_stall_ms']:.0f} |")
    return L


def _llamacpp_paths(systems: list[dict]) -> list[str]:
    """A line per llama.cpp system: its batch-1 rows show the faster of its two paths at each point
    (engines/llamacpp.py: prefer_faster); the table from _llamacpp_points says which."""
    L = []
    for x in systems:
        lp = x.get("llamacpp_path")
        if not lp:
            continue
        b, n = lp["llama_bench"], len(lp["llama_bench"]["tg"][0].get("runs", [])) or 1
        bench_rss, binding_rss = b.get("peak_rss_mb"), lp.get("binding_footprint_mb")
        lower = "llama-bench" if bench_rss and not bench_rss >= (binding_rss or float("inf")) else "the binding"
        L.append(f"**{x['name']}** rows: at each batch-1 point (decode and context), the faster of llama-cpp-python and "
                 f"llama.cpp's own **llama-bench** (median of {n} run{'s' * (n > 1)}, one per repeat between the other systems'; "
                 "llama-bench gives averages, no percentiles: where it is shown, p50 = p90 = p99), per-token figures and "
                 "time to first token chosen apart: the table \"llama.cpp's two paths\" says which. Peak RSS (the memory "
                 f"table and the edge bar) the lower of the two, {lower}'s (llama-bench {_fmt(bench_rss, '.0f')} MB, the binding "
                 f"{_fmt(binding_rss, '.0f')} MB); the other scenarios are the binding's.")
    return L


def _llamacpp_batches(systems: list[dict], summary: list[dict]) -> list[str]:
    """Where llama.cpp's batch cells come from, when the run has llama.cpp."""
    if not any(x["kind"] == "llamacpp" for x in systems):
        return []
    rows = [r for r in summary if r.get("source") == "llama-batched-bench"]
    if not rows:
        return ["llama.cpp runs batch 1 only here (llama-cpp-python decodes one sequence; `make llamacpp` builds "
                "llama-batched-bench for the rest): its other cells are empty.", ""]
    fa = ", ".join(f"{r['system'].removeprefix('llama.cpp ').removesuffix(' cpu')} batch {r['batch']} "
                   f"{'on' if r['flash_attn'] else 'off'}" for r in rows)
    return ["llama.cpp's batch > 1 cells are llama.cpp's own llama-batched-bench (the binding decodes one sequence): "
            "B sequences, each its own prompt, run together, then decoded a step of B tokens at a time; random tokens, "
            f"no sampling; medians of one run per repeat, flash attention off or on, whichever was faster ({fa}).", ""]


def _llamacpp_points(systems: list[dict]) -> list[str]:
    """Both llama.cpp paths at every batch-1 point both measured, the one its rows show in bold."""
    rows = [(x["name"], p) for x in systems for p in (x.get("llamacpp_path") or {}).get("points", [])]
    if not rows:
        return []

    def pair(binding, bench, fa, f=".2f"):
        if bench is None:
            return f"{_fmt(binding, f)} | —"
        b = f"{_fmt(bench, f)} (FA {'on' if fa else 'off'})"
        return f"**{_fmt(binding, f)}** | {b}" if binding <= bench else f"{_fmt(binding, f)} | **{b}**"

    L = ["", "## llama.cpp's two paths (batch 1)", "",
         "llama-cpp-python (the binding, timed as every system is, flash attention on) against llama.cpp's own llama-bench "
         "(fresh processes, after its warm-up; flash attention off and on, the faster shown) at each point; the report's "
         "rows show the figure in bold. Decode: ms per token after a prompt "
         "of that length (the context scenario's prompts, too); TTFT: that prompt's time.", "",
         "| system | point | binding ms/token | llama-bench ms/token | binding TTFT ms | llama-bench TTFT ms |",
         "|" + "---|" * 6]
    for name, p in rows:
        ttft = (pair(p["binding_ttft_ms"], p["llama_bench_ttft_ms"], p["llama_bench_ttft_fa"], ".1f")
                if p["llama_bench_ttft_ms"] is not None else "— | —")
        L.append(f"| {name} | {p['scenario']}: prompt {p['prompt_len']}, {p['new_tokens']} new | "
                 f"{pair(p['binding_ms'], p['llama_bench_ms'], p['llama_bench_fa'])} | {ttft} |")
    return L


def _range(lohi) -> str:
    return f"{lohi[0]}–{lohi[1]}" if lohi else "?"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _accuracy(x: dict) -> dict:
    acc = x.get("accuracy") or {}
    figs = acc.get("teacher_forced") or acc.get("decode_vs_pytorch_fp32") or {}
    d = figs.get("max_abs_logit_diff")
    t = figs.get("top1_agreement")
    return {"dlogit": _fmt(d, ".1e") if d is not None else ("reference" if x["kind"] == "pytorch" else "—"),
            "top1": _fmt(t, ".3f") if t is not None else "—"}


def _plots(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, systems, s = results["summary"], results["systems"], results["settings"]
    p0 = s["prompt_len"][0]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x in systems:
        pts = sorted((r["prompt_len"], r["p50_ms"]) for r in summary if r["system"] == x["name"] and r["scenario"] == "context")
        if pts:
            ax.plot(*zip(*pts), marker="o", label=x["name"])
    ax.set(xlabel="context length (tokens)", ylabel="per-token latency p50 (ms)", title="Per-token latency against context, batch 1")
    ax.set_ylim(bottom=0)
    _save(plt, fig, ax, os.path.join(out, "latency_vs_context.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for x in systems:
        pts = [(1, r["decode_tokens_per_s"]) for r in summary if r["system"] == x["name"] and r["scenario"] == "decode" and r["prompt_len"] == p0]
        pts += [(r["batch"], r["decode_tokens_per_s"]) for r in summary if r["system"] == x["name"] and r["scenario"] == "throughput"]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", label=x["name"])
    ax.set(xlabel="batch size", ylabel="decode tokens/s", title=f"Throughput against batch size (prompt {p0})", xscale="log")
    _save(plt, fig, ax, os.path.join(out, "throughput_vs_batch.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names, vals = [], []
    for x in systems:
        r = _batch1(summary, x["name"], p0)
        if r:
            names.append(x["name"])
            vals.append(r["p50_ms"])
    bars = ax.bar(range(len(vals)), vals, color=["#2a7" if x["kind"] == "ours" else "#888" for x in systems if _batch1(summary, x["name"], p0)])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set(ylabel="per-token latency p50 (ms)", title=f"Batch-1 decode by precision and system (prompt {p0})")
    _save(plt, fig, ax, os.path.join(out, "precisions.png"), legend=False)

    conc = [r for r in summary if r["scenario"] == "concurrent"]
    if conc:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for key in dict.fromkeys((r["system"], r["mode"]) for r in conc):
            pts = sorted((r["clients"], r["tokens_per_s"], r["itl_p99_ms"]) for r in conc if (r["system"], r["mode"]) == key)
            c, tps, itl = zip(*pts)
            ax.plot(c, tps, marker="o", label=" · ".join(key))
            ax2.plot(c, itl, marker="o", label=" · ".join(key))
        ax.set(xlabel="concurrent clients", ylabel="generated tokens/s", title="Throughput against concurrent clients", xscale="log")
        ax2.set(xlabel="concurrent clients", ylabel="inter-token latency p99 (ms)", title="p99 inter-token latency", xscale="log",
                yscale="log")
        clients = sorted({r["clients"] for r in conc})
        for a in (ax, ax2):
            a.set_xticks(clients, [str(c) for c in clients])
            a.minorticks_off()
        ax2.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        _save(plt, fig, ax, os.path.join(out, "concurrent.png"))


def _save(plt, fig, ax, path: str, legend: bool = True) -> None:
    if legend:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a plot of unlabelled series (one system) has no legend to draw
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory(systems: list[dict]) -> list[str]:
    """The footprint table (a fresh process per system loads and generates once) and where our
    processes' memory goes, stage by stage."""
    rows = [x for x in systems if x.get("footprint_mb")]
    if not rows:
        return []
    L = ["", "## Memory: a fresh process that loads and generates once (batch 1)", "",
         "Peak RSS (VmHWM) of a process that does nothing else: the figure an edge deployment pays. The peak RSS "
         "column above is the long-running worker's, after every scenario's batches.", "",
         "| system | peak RSS MB | size on disk MB | peak ÷ size |", "|---|---|---|---|"]
    for x in rows:
        size = x.get("size_bytes") and x["size_bytes"] / 1e6
        L.append(f"| {x['name']} | {x['footprint_mb']:.0f} | {_fmt(size, '.0f')} | {_fmt(size and x['footprint_mb'] / size)} |")
    staged = {x["name"]: {"stages": x["memory_stages"], "peak_mb": x["memory_stages"]["generate"]["VmHWM"]}
              for x in rows if x.get("memory_stages")}
    if staged:
        from gpt2onnx.benchmarks.memory import table

        L += ["", "Where ours goes (MB of resident memory each stage adds; file-backed = weights onnxruntime maps from "
              "model.onnx.data; the session's anonymous growth is mostly onnxruntime's pre-packed copy of the "
              "quantized weights):", "", table(staged)]
    return L


# The CPU edge bars (issue 11), each against llama.cpp at the same precision in the same run: our batch-1
# per-token p50 and a fresh process's peak RSS as fractions of llama.cpp's, and the artifact's size. The
# size bars are stated for DialoGPT-small's shape (12 layers x 768), the model they were set for.
EDGE_SPEED = {"fp32": 0.9, "int8": 0.9, "int4": 0.9}  # our p50 ms/token ÷ llama.cpp's, at most
EDGE_RSS = {"int8": 1.2, "int4": 1.2}  # our fresh-process peak RSS ÷ llama.cpp's, at most
EDGE_SIZE_MB = {"int8": 150, "int4": 100}  # our artifact on disk, at most
EDGE_SHAPE = (12, 768)


def _edge_section(results: dict) -> list[str]:
    """Each bar with the two measured values it compares, met or not."""
    summary, systems, p0 = results["summary"], results["systems"], results["settings"]["prompt_len"][0]
    llama = {x["precision"]: x for x in systems if x["kind"] == "llamacpp"}
    ours = [x for x in systems if x["kind"] == "ours" and x["precision"] in llama]
    if not ours:
        return []
    L = ["", "## The CPU edge bars, against llama.cpp at the same precision", "",
         f"Batch 1, prompt {p0}, {results['settings']['new_tokens']} new tokens, the same run; peak RSS of a fresh process "
         "that loads and generates once (the memory table above).", ""]
    for x in ours:
        a, p = llama[x["precision"]], x["precision"]
        r, ra = _batch1(summary, x["name"], p0), _batch1(summary, a["name"], p0)
        if p in EDGE_SPEED and r and ra:
            v = r["p50_ms"] / ra["p50_ms"]
            L.append(f"- **{x['name']}, per token**: {r['p50_ms']:.2f} ÷ {a['name']} {ra['p50_ms']:.2f} ms = **{v:.2f}×** "
                     f"(target ≤ {EDGE_SPEED[p]:g}: {_met(v <= EDGE_SPEED[p])}).")
        if p in EDGE_RSS and x.get("footprint_mb") and a.get("footprint_mb"):
            v = x["footprint_mb"] / a["footprint_mb"]
            L.append(f"- **{x['name']}, peak RSS**: {x['footprint_mb']:.0f} ÷ {a['name']} {a['footprint_mb']:.0f} MB = "
                     f"**{v:.2f}×** (target ≤ {EDGE_RSS[p]:g}: {_met(v <= EDGE_RSS[p])}).")
        if p in EDGE_SIZE_MB and x.get("size_bytes") and tuple(x.get("shape") or ()) == EDGE_SHAPE:
            mb = x["size_bytes"] / 1e6
            L.append(f"- **{x['name']}, artifact size**: **{mb:.0f} MB** (llama.cpp {_fmt(a.get('size_bytes') and a['size_bytes'] / 1e6, '.0f')} MB; "
                     f"target ≤ {EDGE_SIZE_MB[p]}: {_met(mb <= EDGE_SIZE_MB[p])}).")
    return L


def _compiled_note(systems: list[dict]) -> list[str]:
    """What the pytorch-compile baseline runs, when the run has it."""
    x = next((x for x in systems if x["kind"] == "pytorch-compile"), None)
    if x is None:
        return []
    how = ("`generate` compiles its decode step with torch.compile (mode reduce-overhead, fullgraph: the step replays "
           "as CUDA graphs); compilation and graph capture happen in warm-up generations the system runs the first "
           "time it meets each batch size, before any timed run, and the prompt pass runs eagerly" if x.get("compiled")
           else "not compiled here (transformers compiles `generate`'s step on CUDA only): the static-cache path alone")
    return ["", f"{x['name']}: transformers `generate` with a static KV cache (one `StaticCache` per batch size over the "
                f"model's whole position table, reset between calls, so the step keeps one shape); {how}."]


def _optimum_note(systems: list[dict]) -> list[str]:
    """How the optimum baseline's graph was made, when the run has it."""
    x = next((x for x in systems if x["kind"] == "optimum"), None)
    if x is None:
        return []
    from .engines.optimum import OPTIMIZATION

    L = ["", f"{x['name']}: ORTModelForCausalLM over optimum's export of the same checkpoint, optimized as optimum's docs "
             f"show for GPT-2 (`optimum-cli export onnx --optimize {OPTIMIZATION}`: onnxruntime's transformer fusions and the "
             "GELU approximation), the same onnxruntime and threads as ours."]
    q = next((y for y in systems if y["kind"] == "optimum" and y["precision"] == "int8"), None)
    if q:
        isa = os.path.basename(q["path"].rstrip("/")).split("-")[2]  # optimum-int8-ISA-checkpoint
        L[-1] += (f" {q['name']}: optimum's plain export quantized as optimum quantizes for a CPU (`optimum-cli onnxruntime "
                  f"quantize --{isa}`: dynamic int8 MatMuls, per tensor, the CLI's default; activations and KV cache stay "
                  "float32; its quantizer cannot type the O3 graph's fused nodes, so this graph is not fused).")
    return L


# The GPU bars (issue 19), for DialoGPT-medium fp16 on an H100 or H200, stated with the measured values.
GPU_STEP_MS = 1.0  # our batch-1 p50 ms/token, at most, with the decode step captured
GPU_ITL = 3.0  # scheduler p99 inter-token latency at BAR_CLIENTS ÷ our batch-1 p50, at most
GPU_SHAPE = (24, 1024)  # DialoGPT-medium's layers x width: the model the bars were set for


def _capture(out: str) -> dict | None:
    """The capture check (benchmarks/gpu_check.py) when it wrote capture.json into this report's directory."""
    import json

    path = os.path.join(out, "capture.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _gpu_section(results: dict, capture: dict | None) -> list[str]:
    """The capture check's summary (when run beside this report), then on CUDA each GPU bar with the
    values it compares, met or not."""
    s, summary, systems = results["settings"], results["summary"], results["systems"]
    L = []
    if capture:
        from .gpu_check import render

        L += ["", "## CUDA graph capture check (benchmarks/gpu_check.py, `capture.md`)", "", *render(capture)]
    if s["provider"] != "cuda":
        return L
    p0 = s["prompt_len"][0]
    ours = [x for x in systems if x["kind"] == "ours" and x["precision"] == "fp16"]
    compiled = next((x for x in systems if x["kind"] == "pytorch-compile"), None)
    L += ["", "## The GPU bars", "",
          f"Batch 1, prompt {p0}, {s['new_tokens']} new tokens, the same run (the batch-1 table above); the scheduler at "
          f"{BAR_CLIENTS} clients from the concurrent scenario. Set for DialoGPT-medium fp16 on an H100 or H200.", ""]
    for x in ours:
        r = _batch1(summary, x["name"], p0)
        if r is None:
            continue
        other = " (a model other than DialoGPT-medium: for reference)" if x.get("shape") and tuple(x["shape"]) != GPU_SHAPE else ""
        graph = {True: "captured (session created with enable_cuda_graph)", False: "**not captured**"}.get(x.get("cuda_graph"),
                                                                                                         "capture not recorded")
        ok = r["p50_ms"] <= GPU_STEP_MS and x.get("cuda_graph") is True
        L.append(f"- **{x['name']}, per token**{other}: p50 **{r['p50_ms']:.2f} ms**, step {graph} (target ≤ {GPU_STEP_MS:g} ms "
                 f"with the step captured: {_met(ok)}).")
        if x.get("device_pick") is not None:  # recorded since pick.onnx (2026-12-06); batch 1 never takes it
            L.append(f"- **{x['name']}**: greedy's pick on the device (pick.onnx, steps of 4 rows or more: batch 64, the "
                     f"scheduler): {'on' if x['device_pick'] else '**off** (logits copied to the host every step)'}.")
        rb = compiled and _batch1(summary, compiled["name"], p0)
        if rb:
            v = r["p50_ms"] / rb["p50_ms"]
            L.append(f"- **{x['name']} against {compiled['name']}**: {r['p50_ms']:.2f} ÷ {rb['p50_ms']:.2f} ms = **{v:.2f}×** "
                     f"(target < 1: {_met(v < 1)}).")
        else:
            L.append(f"- **{x['name']} against PyTorch static cache + torch.compile**: not measured in this run "
                     "(`--baselines pytorch-compile`).")
        conc = [q for q in summary if q["scenario"] == "concurrent" and q["system"] == x["name"] and q["clients"] == BAR_CLIENTS
                and (q["mode"] == "scheduler" or q["mode"].startswith(("chunked", "mixed")))]
        for c in conc:
            v = c["itl_p99_ms"] / r["p50_ms"]
            mode = "scheduler" if c["mode"] == "scheduler" else f"scheduler ({c['mode']})"
            L.append(f"- **{x['name']}, {mode} at C={BAR_CLIENTS}**: p99 inter-token latency {c['itl_p99_ms']:.2f} ms ÷ batch-1 "
                     f"p50 {r['p50_ms']:.2f} ms = **{v:.2f}×** (target ≤ {GPU_ITL:g}: {_met(v <= GPU_ITL)}).")
        if not conc:
            L.append(f"- **{x['name']}, scheduler at C={BAR_CLIENTS}**: not measured in this run (`--concurrent-clients {BAR_CLIENTS}`).")
    return L


def _beams(beams: dict[str, list[dict]]) -> list[str]:
    """Beam search at batch 1: what a reply token costs with 1 and K beams."""
    if not beams:
        return []
    L = ["", "## Beam search (batch 1)", "",
         "One prompt, EOS off, 1 and K beams interleaved (benchmarks/beam_speed.py). ms/token = (wall - prefill) / "
         "new tokens: the model step over K rows, the beam bookkeeping and the KV cache reorder together.", "",
         "| system | beams | prefill ms | ms/token | model step p50 ms | tokens/s | × 1 beam |", "|---|---|---|---|---|---|---|"]
    for name, rows in beams.items():
        for r in rows:
            L.append(f"| {name} | {r['num_beams']} | {r['prefill_ms']:.1f} | {r['ms_per_token']:.2f} | {r['step_p50_ms']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {_fmt(r['vs_one_beam'])} |")
    return L


def main(argv: list[str] | None = None) -> None:
    """Re-render a report from its results.json: python -m gpt2onnx.benchmarks.report DIR."""
    import json

    from .settings import ToolParser

    p = ToolParser(prog="python -m gpt2onnx.benchmarks.report", description="re-render a benchmark report from its results.json")
    p.add_argument("dir", help="a report directory written by gpt2onnx bench")
    a = p.parse_args(argv)
    path = os.path.join(a.dir, "results.json")
    if not os.path.isfile(path):
        p.error(f"{a.dir} holds no results.json; give a report directory `gpt2onnx bench --out` wrote")
    from .results import publish

    with open(path, encoding="utf-8") as f:
        res = json.load(f)
    publish(a.dir, lambda tmp: write_report(res, a.dir, into=tmp))


if __name__ == "__main__":
    main()
