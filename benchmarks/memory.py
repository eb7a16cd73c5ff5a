"""Where a process's memory goes: one fresh process per artifact loads it and generates once.

    python -m gpt2onnx.benchmarks.memory ARTIFACT... [--prompt-len 32] [--new-tokens 64] [--out F.json]

Each stage's resident memory is read from /proc/self/status in a clean interpreter (spawned: nothing
inherited): the interpreter with numpy; + the runtime's imports (onnxruntime, tokenizers); + the
tokenizer; + the session (the weights: file-backed pages where onnxruntime maps the external data,
anonymous memory where it copies or pre-packs them); + one batch-1 generation (KV cache, arena).
The peak (VmHWM) is the figure the benchmark's footprint row compares with other engines.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

STAGES = ("interpreter", "imports", "tokenizer", "session", "generate")


def status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS, VmHWM (peak), RssAnon and RssFile of a process (this one by default) in MB: the one
    reader of /proc/PID/status the benchmarks share. VmHWM, not ru_maxrss, for a peak: Linux carries
    ru_maxrss across exec, so a spawned worker would report its parent's."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _probe(path: str, prompt_len: int, new_tokens: int, session_options: dict, conn) -> None:
    import warnings

    from gpt2onnx import warning_line  # the standard library only: nothing for the stages below to count

    warnings.formatwarning = warning_line  # as the CLI's: this is a spawned interpreter of its own
    try:
        import numpy as np

        stages = {"interpreter": status()}
        import onnxruntime  # noqa: F401  (what the runtime imports, measured on their own)
        import tokenizers  # noqa: F401

        from gpt2onnx.runtime import Engine
        from gpt2onnx.runtime.artifact import load_manifest

        stages["imports"] = status()
        tok = tokenizers.Tokenizer.from_file(load_manifest(path).file("tokenizer.json"))
        stages["tokenizer"] = status()
        del tok
        engine = Engine.load(path, provider="cpu", verify="size", **session_options)
        stages["session"] = status()
        rows = [list(np.random.default_rng(0).integers(0, engine.vocab_size - 1, prompt_len))]
        engine.generate(rows, max_new_tokens=new_tokens, eos_token_id=-1)
        stages["generate"] = status()
        conn.send({"stages": stages, "peak_mb": stages["generate"]["VmHWM"]})
    except Exception as e:  # one line to the parent
        conn.send({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


def footprint(path: str, prompt_len: int = 32, new_tokens: int = 64, **session_options) -> dict:
    """Stage-by-stage memory of a fresh process that loads `path` and generates once."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_probe, args=(path, prompt_len, new_tokens, session_options, child))
    p.start()
    msg = parent.recv()
    p.join()
    if "error" in msg:
        raise RuntimeError(f"{path}: {msg['error']}")
    return msg


def systems_footprint(specs, systems: list[dict], prompt_len: int, new_tokens: int, log) -> None:
    """Peak resident memory of a fresh worker per system that loads it and generates once (batch 1,
    `prompt_len`, `new_tokens`): what an edge deployment pays, free of the other scenarios' batches;
    written into each system's record as footprint_mb. For ours on the CPU, also the stage-by-stage
    breakdown above (memory_stages).

    Raises:
        Gpt2OnnxError: one of ours died; a baseline that dies only leaves its cell empty.
    """
    from gpt2onnx.runtime.errors import Gpt2OnnxError

    from .worker import Worker, WorkerDied, WorkerError

    for spec, sysrec in zip(specs, systems):
        log(f"footprint of {spec.name}")
        try:
            w = Worker(spec)
            try:
                w.request("generate", batch=1, prompt_len=prompt_len, new_tokens=new_tokens)
                sysrec["footprint_mb"] = w.request("memory")["peak_rss_mb"]
            finally:
                w.close()
        except (WorkerDied, WorkerError) as e:
            if spec.kind == "ours":
                raise Gpt2OnnxError(f"{spec.name}: {e} while measuring its footprint") from None
            log(f"no footprint for {spec.name}: {e}")  # its memory table cell stays empty
        if spec.kind == "ours" and spec.provider == "cpu":
            sysrec["memory_stages"] = footprint(spec.path, prompt_len, new_tokens)["stages"]


def table(rows: dict[str, dict]) -> str:
    """Markdown: one row per artifact, the memory each stage adds, then the peak."""
    head = "| system | interpreter + numpy | + onnxruntime, tokenizers | + tokenizer | + session (weights) | + generate | peak RSS | of which file-backed |"
    lines = [head, "|" + "---|" * 8]
    for name, r in rows.items():
        s = r["stages"]
        add = [s["interpreter"]["VmRSS"]] + [s[b]["VmRSS"] - s[a]["VmRSS"] for a, b in zip(STAGES, STAGES[1:])]
        lines.append(f"| {name} | " + " | ".join(f"{x:.0f}" for x in add)
                     + f" | {r['peak_mb']:.0f} | {s['generate']['RssFile']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    from gpt2onnx.runtime import load_manifest

    from .settings import ToolParser

    ap = ToolParser(prog="python -m gpt2onnx.benchmarks.memory", description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    ap.at_least(args, prompt_len=1, new_tokens=1)
    ap.output_file(args.out, "--out")
    for a in args.artifacts:  # here, in one line, not as a worker's failure
        ap.run(load_manifest, a, verify="size")
    rows = {os.path.basename(os.path.normpath(a)): ap.run(footprint, a, args.prompt_len, args.new_tokens) for a in args.artifacts}
    print(table(rows))
    if args.out:
        from .results import write_json

        write_json(args.out, rows)


if __name__ == "__main__":
    sys.exit(main())
