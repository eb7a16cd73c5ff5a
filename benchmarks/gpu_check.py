"""The CUDA-graph capture check: is the decode step replayed from a captured graph, with the tokens
the uncaptured step gives?

    python -m gpt2onnx.benchmarks.gpu_check ARTIFACT_DIR --out DIR [--provider cuda|cpu]

The artifact is loaded twice, `Engine.load(cuda_graph=True)` and `cuda_graph=False`; both greedily
generate the same prompts (several lengths at batch 1, one batch of 4, and the batch-1 prompts
together in one right-padded batch, whose rows are also compared with the same prompts alone) and
are then timed at batch 1, interleaved run by run. The same batch-1 prompts then go through the
captured engine's Scheduler with prompt_width CHUNK (queued at once, the shortest first: the others'
prompts go in fixed-width chunks, captured per slot, while it decodes), each row against its tokens alone. `engine.session_config.cuda_graph` says whether onnxruntime accepted
`enable_cuda_graph` for the session (the runtime leaves it True only then; a refusal is a warning at
load, recorded here). That the step was then replayed is not visible through the runtime's API: the
ms/token of the two engines is the evidence, and equal tokens say the replay computed what the
uncaptured step computes. Writes DIR/capture.json and DIR/capture.md; report.py puts the summary into
a benchmark report written to the same DIR.

On the cpu provider nothing is captured (CUDA graphs are the CUDA provider's), and the check still
runs end to end: what the tests exercise on the tiny artifact.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

from .workloads import prompt_rows

PROMPT_LENS = (8, 32, 100, 300)  # generated at batch 1 each; those that do not fit the context are left out
BATCH = 4  # one batch of this many equal-length prompts: a second graph bucket
NEW_TOKENS = 32  # per prompt of the token comparison
TIMING_PROMPT = 32  # the timed generation: batch 1, as the benchmark's decode scenario
TIMING_TOKENS = 128
REPEATS = 5  # timed runs per engine, interleaved (median reported)
MODES = {"captured": True, "uncaptured": False}  # the cuda_graph each engine is loaded with
CHUNK = 64  # the scheduler's prompt_width in the chunk check (gpu.sh's concurrent mode chunked64)


def check(artifact: str, provider: str = "cuda", new_tokens: int = NEW_TOKENS, repeats: int = REPEATS,
          timing_tokens: int = TIMING_TOKENS, log=print) -> dict:
    """Load `artifact` with and without CUDA graphs, compare their greedy tokens, time both.

    Returns the capture.json record (see `render` for what each field means).

    Raises:
        Gpt2OnnxError: the artifact or the provider cannot be loaded.
    """
    import onnxruntime as ort

    from gpt2onnx.runtime import Engine

    engines, runs = {}, {}
    for mode, graph in MODES.items():
        log(f"loading {artifact} on {provider}, cuda_graph={graph}")
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            e = Engine.load(artifact, provider=provider, cuda_graph=graph, verify="size")
        engines[mode] = e
        runs[mode] = {"cuda_graph_requested": graph, "session_cuda_graph": bool(e.session_config.cuda_graph),
                      "load_s": time.perf_counter() - t, "load_warnings": [str(w.message)[:300] for w in caught]}
    first = engines["captured"]
    n_pos = first.n_positions
    lens = [n for n in PROMPT_LENS if n + new_tokens <= n_pos]
    timing_tokens = min(timing_tokens, n_pos - TIMING_PROMPT)
    # (label, rows): each prompt alone, then one batch of BATCH rows
    calls = [(f"batch 1, prompt {n}", prompt_rows(1, n, first.vocab_size)) for n in lens]
    calls.append((f"batch {BATCH}, prompt {lens[0]}", prompt_rows(BATCH, lens[0], first.vocab_size)))
    # the batch-1 prompts again, together: one right-padded prompt pass, each row's tokens against its own alone
    calls.append((f"batch {len(lens)}, prompts {'/'.join(map(str, lens))}", [rows[0] for _, rows in calls[: len(lens)]]))

    tokens = {}
    for mode, e in engines.items():
        log(f"generating {len(calls)} calls of {new_tokens} tokens, {mode}")
        tokens[mode] = [e.generate(rows, max_new_tokens=new_tokens, eos_token_id=-1) for _, rows in calls]
    divergence = compare([label for label, _ in calls], tokens["captured"], tokens["uncaptured"])
    alone = [t[0] for t in tokens["captured"][: len(lens)]]
    padded = compare([calls[-1][0]], [tokens["captured"][-1]], [alone])  # captured: the batched rows vs each alone
    log(f"scheduler with prompt_width {CHUNK}: {len(lens)} prompts, captured engine")
    chunked = scheduled_chunks(first, [rows[0] for _, rows in calls[: len(lens)]], new_tokens)
    chunk_div = compare([f"scheduler, prompt_width {CHUNK}"], [chunked["tokens"]], [alone])

    rows = prompt_rows(1, TIMING_PROMPT, first.vocab_size)
    steps: dict[str, list[float]] = {m: [] for m in engines}
    ttft: dict[str, list[float]] = {m: [] for m in engines}
    log(f"timing: batch 1, prompt {TIMING_PROMPT}, {timing_tokens} tokens, {repeats} repeats interleaved")
    for e in engines.values():  # a warm-up of the timed shape, not recorded
        e.generate(rows, max_new_tokens=timing_tokens, eos_token_id=-1)
    for _ in range(repeats):
        for mode, e in engines.items():
            e.generate(rows, max_new_tokens=timing_tokens, eos_token_id=-1)
            steps[mode].append(float(np.percentile(e.stats.step_s, 50)) * 1e3)
            ttft[mode].append(e.stats.ttft_s * 1e3)
    for mode in engines:
        runs[mode]["p50_ms"] = float(np.median(steps[mode]))
        runs[mode]["ttft_ms"] = float(np.median(ttft[mode]))
    m = first.manifest.raw
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "artifact": artifact, "checkpoint": m.get("source", {}).get("checkpoint"), "precision": m.get("precision"),
        "provider": first.provider, "onnxruntime": ort.__version__,
        "runs": runs,
        "calls": [label for label, _ in calls], "new_tokens": new_tokens,
        "tokens_equal": not divergence, "divergence": divergence,
        "padded_batch": {"call": calls[-1][0], "rows": len(lens), "equal_alone": len(lens) - len(padded), "divergence": padded},
        "scheduler_chunks": {"prompt_width": CHUNK, "rows": len(lens), "equal_alone": len(lens) - len(chunk_div),
                             "divergence": chunk_div, "chunk_passes": chunked["chunk_passes"],
                             "mixed_passes": chunked["mixed_passes"]},
        "timing": {"batch": 1, "prompt_len": TIMING_PROMPT, "new_tokens": timing_tokens, "repeats": repeats},
        # the verdict: a session with enable_cuda_graph, and the same tokens as the uncaptured one
        "captured": runs["captured"]["session_cuda_graph"] and not divergence,
        "speedup": runs["uncaptured"]["p50_ms"] / runs["captured"]["p50_ms"],
    }
    return result


def scheduled_chunks(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy replies through a Scheduler with prompt_width CHUNK, all queued at once, shortest first:
    its prompt runs alone while nothing decodes, and the others' go in fixed-width chunks while it
    does. Returns {tokens: [row][token], chunk_passes: the (slot, width) chunk bindings made, each a
    captured graph under CUDA graphs, mixed_passes: the (bucket, slot, width) bindings of chunks that ran
    inside a decode step's pass (the engine's mixed step graph, where it has one)}."""
    from gpt2onnx.runtime import Scheduler, SchedulerConfig

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with Scheduler(engine, SchedulerConfig(max_batch=len(prompts), prompt_width=CHUNK, prefill_chunk=CHUNK)) as s:
        with s.cv:  # queued before the loop admits any
            handles = {i: s.submit(prompts[i], max_new_tokens=new_tokens, eos_token_id=-1) for i in order}
        tokens = [handles[i].result(timeout=300).tokens for i in range(len(prompts))]
        passes = sorted((first_row, width) for _, first_row, _, width in s.kv._steps if width == CHUNK)
        mixed = sorted((b, row, width) for _, b, row, width in s.kv._mixed)
    return {"tokens": tokens, "chunk_passes": [list(p) for p in passes], "mixed_passes": [list(m) for m in mixed]}


def compare(labels: list[str], a: list[list[list[int]]], b: list[list[list[int]]]) -> list[dict]:
    """The rows whose tokens differ between two engines' outputs of the same calls ([call][row][token]):
    [{call, row, first_diff (the first differing position, or the shorter length), length}]."""
    out = []
    for label, rows_a, rows_b in zip(labels, a, b, strict=True):
        for row, (x, y) in enumerate(zip(rows_a, rows_b, strict=True)):
            x, y = list(x), list(y)
            if x != y:
                at = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                out.append({"call": label, "row": row, "first_diff": at, "length": max(len(x), len(y))})
    return out


def render(r: dict) -> list[str]:
    """The check as markdown lines: verdict, one row per engine, any divergence."""
    c = r["runs"]["captured"]
    t = r["timing"]
    differ = f"{len(r['divergence'])} rows differ"
    verdict = ("**captured**: the session was created with enable_cuda_graph and its tokens equal the uncaptured "
               "session's" if r["captured"] else
               "**not captured**: " + ("the session has enable_cuda_graph but its tokens differ from the uncaptured session's"
                                       if c["session_cuda_graph"] else "onnxruntime refused enable_cuda_graph"
                                       if r["provider"] == "CUDAExecutionProvider" else f"the {r['provider']} has no CUDA graphs"))
    L = [f"{r['created']} · {r['checkpoint']} {r['precision']} · provider {r['provider']} · onnxruntime {r['onnxruntime']}", "",
         f"Capture: {verdict}. Greedy tokens compared over {len(r['calls'])} generations of {r['new_tokens']} tokens "
         f"({'; '.join(r['calls'])}): {'all equal' if r['tokens_equal'] else differ}. "
         f"Timed at batch {t['batch']}, prompt {t['prompt_len']}, {t['new_tokens']} new tokens, medians of {t['repeats']} "
         "interleaved runs; that the captured step is replayed shows in its ms/token (the runtime's API does not expose "
         f"replays): uncaptured ÷ captured = **{r['speedup']:.2f}×**.", "",
         "| engine | cuda_graph asked | session has enable_cuda_graph | load s | TTFT ms | p50 ms/token |", "|---|---|---|---|---|---|"]
    for mode, x in r["runs"].items():
        L.append(f"| {mode} | {'yes' if x['cuda_graph_requested'] else 'no'} | {'yes' if x['session_cuda_graph'] else 'no'} | "
                 f"{x['load_s']:.2f} | {x['ttft_ms']:.1f} | {x['p50_ms']:.3f} |")
    pb = r.get("padded_batch")
    if pb:
        L += ["", f"Prompts of different lengths in one right-padded batch ({pb['call']}, captured engine): "
                  f"{pb['equal_alone']} of {pb['rows']} rows give the tokens they give alone"
                  + "".join(f"; row {d['row']} first differs at token {d['first_diff']}" for d in pb["divergence"]) + "."]
    sc = r.get("scheduler_chunks")
    if sc:
        L += ["", f"The same prompts through the captured engine's Scheduler with prompt_width {sc['prompt_width']} ("
                  f"queued at once, the shortest first, the others' prompts in fixed {sc['prompt_width']}-column chunks while it decodes; chunk "
                  f"passes bound for {len(sc['chunk_passes'])} slots"
                  + (f", chunks inside a decode step's pass (mixed.onnx) bound for {len(sc['mixed_passes'])} bucket and slot pairs"
                     if sc.get("mixed_passes") else "")
                  + f"): {sc['equal_alone']} of {sc['rows']} rows give the tokens "
                  "they give alone" + "".join(f"; row {d['row']} first differs at token {d['first_diff']}" for d in sc["divergence"]) + "."]
    for w in c["load_warnings"]:
        L += ["", f"Warning at load (cuda_graph=True): {w}"]
    if r["divergence"]:
        L += ["", "Rows whose tokens differ (first differing position of the reply; on synthetic weights' flat logits a late "
                  "difference can be fp16 rounding of different kernels, a difference at 0 or 1 is a wrong step):", ""]
        L += [f"- {d['call']}, row {d['row']}: first differs at token {d['first_diff']} of {d['length']}" for d in r["divergence"]]
    return L


def write(result: dict, out: str) -> None:
    write_record(out, "capture", "CUDA graph capture check", result, render(result))


def write_record(out: str, stem: str, title: str, result: dict, lines: list[str]) -> None:
    """DIR/stem.json (the record) and DIR/stem.md (its rendering under `title`): the GPU checks' output pair."""
    from .results import publish

    def fill(tmp: str) -> None:
        with open(os.path.join(tmp, f"{stem}.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(tmp, f"{stem}.md"), "w") as f:
            f.write("\n".join([f"# {title}", "", *lines, ""]))

    publish(out, fill)


def parser() -> argparse.ArgumentParser:
    from .settings import ToolParser

    p = ToolParser(prog="python -m gpt2onnx.benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", metavar="ARTIFACT_DIR")
    p.add_argument("--out", required=True, help="directory for capture.json and capture.md")
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help="cpu runs the check without capture (tests)")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens per generation of the token comparison")
    p.add_argument("--timing-tokens", type=int, default=TIMING_TOKENS, help="tokens per timed generation")
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed generations per engine")
    return p


def main(argv: list[str] | None = None) -> None:
    from gpt2onnx.runtime.errors import Gpt2OnnxError

    p = parser()
    a = p.parse_args(argv)
    if a.new_tokens < 2 or a.timing_tokens < 2 or a.repeats < 1:
        p.error("--new-tokens and --timing-tokens must be >= 2, --repeats >= 1")
    p.output_dir(a.out)  # before the measuring, not a FileExistsError after it
    try:
        result = check(a.artifact, a.provider, a.new_tokens, a.repeats, a.timing_tokens,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
    except Gpt2OnnxError as e:
        sys.exit(f"error: {e}")
    write(result, a.out)
    print("\n".join(render(result)))


if __name__ == "__main__":
    main()
