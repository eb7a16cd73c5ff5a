"""Where a decode step's time goes (or, with --prompt, a prompt's): onnxruntime's node profile, by operator,
beside the weight bytes each operator reads and the rate it reads them at.

    python -m gpt2onnx.benchmarks.profile ARTIFACT [--batch 1] [--prompt-len 32] [--new-tokens 64]
                                          [--prompt] [--threads N] [--json OUT]

One untimed warm-up generation, then one profiled generation (seeded random prompts, one per row of
--batch, EOS off, so it decodes exactly --new-tokens steps). Only the decode steps count (the prompt's
passes are dropped); with --prompt only the prompt's passes count (all of them: a long prompt over an int8
cache runs in several, decoder.INT8_KV_PASS), and the figures are per prompt, not per step.
Per operator type, per step: milliseconds of kernel time, its share of the step, the initializer
bytes its nodes read (the stored graph's initializers; an embedding Gather reads one row) and those
bytes over its time in GB/s, beside the machine's read bandwidth measured in the same process
(benchmarks/machine.py). An operator that reads its weights near that rate is bound by memory.
The step's wall time includes what the kernels do not: onnxruntime's run overhead and the
thread pool's hand-offs ("outside kernels").
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import tempfile

import numpy as np


def profile(path: str, prompt_len: int = 32, new_tokens: int = 64, threads: int | None = None, seed: int = 0,
            batch: int = 1, prompt: bool = False) -> dict:
    """Profile one generation of the artifact at `path`; returns the figures (module docstring)."""
    if prompt:
        new_tokens = 1  # the prompt's passes and its first token: no decode step
    from gpt2onnx.runtime import Engine
    from gpt2onnx.runtime.session import build_session

    from .machine import memory_bandwidth_gbs

    base = Engine.load(path, provider="cpu", threads=threads)
    sc = base.session_config
    manifest, tokenizer, provider = base.manifest, base.tokenizer, base.provider
    del base  # its session's memory goes before the profiled one is built
    with tempfile.TemporaryDirectory() as tmp:
        session = build_session(manifest, provider, sc, profile_prefix=os.path.join(tmp, "decode"))
        engine = Engine(manifest, session, tokenizer, provider, sc)
        prompts = np.random.default_rng(seed).integers(0, engine.vocab_size - 1, (batch, prompt_len)).tolist()
        for _ in range(2):  # warm-up, then the profiled generation
            engine.generate(prompts, max_new_tokens=new_tokens, eos_token_id=-1)
        events = json.load(open(session.end_profiling()))
    bandwidth = memory_bandwidth_gbs()["read"]

    weights = _weight_bytes(engine.manifest.file("model.onnx"))
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    ours = runs[len(runs) // 2:]  # the profiled generation's passes: its prompt's, then new_tokens - 1 steps
    passes = len(ours) - (new_tokens - 1)
    steps = ours[:passes] if prompt else ours[passes:]
    first, end = steps[0]["ts"], steps[-1]["ts"] + steps[-1]["dur"]
    by_op = collections.defaultdict(lambda: {"us": 0.0, "bytes": 0, "nodes": set()})
    by_shape = collections.defaultdict(lambda: {"us": 0.0, "bytes": 0, "nodes": set()})  # (op, weight bytes)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or not first <= e["ts"] <= end:
            continue
        a = e["args"]
        row = by_op[a["op_name"]]
        node = e["name"][: -len("_kernel_time")]
        b = weights.get(node, 0 if a["op_name"].startswith("Gather") else int(a.get("parameter_size", 0)))
        for r in (row, by_shape[(a["op_name"], b)]) if b else (row,):
            r["us"] += e["dur"]
            r["bytes"] += b
            r["nodes"].add(node)
    n = 1 if prompt else len(steps)  # figures per prompt (all its passes), or per decode step
    step_ms = sum(s["dur"] for s in steps) / 1e3 if prompt else statistics.median(s["dur"] for s in steps) / 1e3
    ops = []
    for op, r in sorted(by_op.items(), key=lambda kv: -kv[1]["us"]):
        ms = r["us"] / n / 1e3
        mb = r["bytes"] / n / 1e6
        ops.append({"op": op, "nodes": len(r["nodes"]), "ms_per_step": ms, "share": ms / step_ms,
                    "weights_mb_per_step": mb, "gbs": mb / ms if mb else None})
    heavy = [{"op": op, "weights_mb_per_node": b / 1e6, "nodes": len(r["nodes"]), "ms_per_step": r["us"] / n / 1e3,
              "gbs": r["bytes"] / r["us"] / 1e3} for (op, b), r in sorted(by_shape.items(), key=lambda kv: -kv[1]["us"])]
    kernels = sum(o["ms_per_step"] for o in ops)
    weights_mb = sum(o["weights_mb_per_step"] for o in ops)
    return {"artifact": path, "precision": manifest.precision, "batch": batch, "threads": sc.threads or os.cpu_count() or 1,
            "mode": "prompt" if prompt else "decode", "prompt_len": prompt_len,
            "huge_pages": sc.huge_pages,
            "steps": len(steps), "step_ms_p50": step_ms, "kernels_ms": kernels, "outside_kernels_ms": step_ms - kernels,
            "weights_mb_per_step": weights_mb, "floor_ms": weights_mb / bandwidth, "read_bandwidth_gbs": bandwidth,
            "ops": ops, "weight_groups": heavy}


def _weight_bytes(model_path: str) -> dict[str, int]:
    """Bytes of the initializers each node of the stored graph reads per run, by node name. A Gather
    (the token and position embeddings) reads one row per token, not its table: left out. Nodes that
    onnxruntime fuses at load get names of their own and fall back to its `parameter_size`."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    size = {t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            for t in model.graph.initializer}
    return {n.name: sum(size.get(i, 0) for i in n.input) for n in model.graph.node if not n.op_type.startswith("Gather")}


def render(p: dict) -> str:
    pages = "2 MB pages" if p["huge_pages"] else "4 KB pages"
    what = (f"a {p['prompt_len']}-token prompt {p['step_ms_p50']:.2f} ms in {p['steps']} pass{'es' if p['steps'] != 1 else ''}" if p.get("mode") == "prompt"
            else f"decode step p50 {p['step_ms_p50']:.2f} ms over {p['steps']} steps")
    unit = "prompt" if p.get("mode") == "prompt" else "step"
    lines = [f"{p['artifact']} ({p['precision']}, batch {p.get('batch', 1)}, {p['threads']} threads, weights on {pages}): "
             f"{what}; kernels {p['kernels_ms']:.2f} ms, outside kernels {p['outside_kernels_ms']:.2f} ms",
             f"weights read per {unit} {p['weights_mb_per_step']:.0f} MB; read bandwidth {p['read_bandwidth_gbs']:.1f} GB/s "
             f"-> floor {p['floor_ms']:.2f} ms ({p['floor_ms'] / p['step_ms_p50']:.0%} of the {unit})",
             "", f"| operator | nodes | ms/{unit} | share | weights MB/{unit} | GB/s (% of read bw) |", "|---|---|---|---|---|---|"]
    for o in p["ops"]:
        rate = f"{o['gbs']:.1f} ({o['gbs'] / p['read_bandwidth_gbs']:.0%})" if o["gbs"] else "—"
        lines.append(f"| {o['op']} | {o['nodes']} | {o['ms_per_step']:.3f} | {o['share']:.1%} | "
                     f"{o['weights_mb_per_step']:.1f} | {rate} |")
    lines += ["", "Operators that read weights, by weight size per node:", "",
              f"| operator | weights MB per node | nodes | ms/{unit} | GB/s (% of read bw) |", "|---|---|---|---|---|"]
    for g in (g for g in p["weight_groups"] if g["weights_mb_per_node"] >= 0.1):
        lines.append(f"| {g['op']} | {g['weights_mb_per_node']:.2f} | {g['nodes']} | {g['ms_per_step']:.3f} | "
                     f"{g['gbs']:.1f} ({g['gbs'] / p['read_bandwidth_gbs']:.0%}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from .settings import ToolParser

    p = ToolParser(prog="python -m gpt2onnx.benchmarks.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt", action="store_true", help="profile the prompt's passes, not the decode steps")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    p.at_least(a, batch=1, prompt_len=1, new_tokens=2)
    p.output_file(a.json, "--json")
    result = p.run(profile, a.artifact, a.prompt_len, a.new_tokens, a.threads, batch=a.batch, prompt=a.prompt)
    print(render(result))
    if a.json:
        from .results import write_json

        write_json(a.json, result, indent=1)


if __name__ == "__main__":
    main()
