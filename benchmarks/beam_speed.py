"""Beam search speed: one prompt decoded with 1 and K beams at batch 1 (the report's beams 1 / 4 row).

    python -m gpt2onnx.benchmarks.beam_speed ARTIFACT [--beams 1,4] [--prompt-len 32] [--new-tokens 64]
                                             [--repeats 5] [--threads N] [--json OUT]

The prompt is seeded random ids. EOS never ends a run (eos_token_id=-1), so every run decodes
exactly --new-tokens steps whatever the weights. After one untimed warm-up per point, the points
run interleaved (1, 4, 1, 4, ...) `repeats` times; figures are medians over repeats:
  prefill_ms        the prompt pass (K copies of the prompt with K beams)
  ms_per_token      (wall - prefill) / new tokens: the model step, the beam bookkeeping and the
                    KV cache reorder together, what a user waits per token of the reply
  step_p50_ms       the model step alone (median over the steps of a run)
  tokens_per_s      new tokens of the returned reply per second of decode
  vs_one_beam       ms_per_token over the 1-beam point's
"""

from __future__ import annotations

import statistics
import time

import numpy as np


def measure(engine, beams=(1, 4), prompt_len: int = 32, new_tokens: int = 64, repeats: int = 5, seed: int = 0) -> list[dict]:
    """Time `engine.generate` at batch 1 for each beam count; returns one dict per beam count (see
    the module docstring for the figures)."""
    prompt = np.random.default_rng(seed).integers(0, engine.vocab_size - 1, prompt_len).tolist()
    runs: dict[int, list[dict]] = {k: [] for k in beams}

    def once(k: int) -> dict:
        t = time.perf_counter()
        out = engine.generate([prompt], max_new_tokens=new_tokens, num_beams=k, eos_token_id=-1)[0]
        wall, s = time.perf_counter() - t, engine.stats
        assert len(out) == new_tokens, (k, len(out))
        return {"wall_s": wall, "prefill_s": s.prefill_s, "step_p50_ms": s.per_token_p50_ms}

    for k in beams:  # warm-up: session arenas, first-use allocations
        once(k)
    for _ in range(repeats):
        for k in beams:
            runs[k].append(once(k))
    rows = []
    for k in beams:
        med = {f: statistics.median(r[f] for r in runs[k]) for f in ("wall_s", "prefill_s", "step_p50_ms")}
        per_token = 1e3 * (med["wall_s"] - med["prefill_s"]) / new_tokens
        rows.append({"num_beams": k, "batch": 1, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
                     "prefill_ms": 1e3 * med["prefill_s"], "ms_per_token": per_token, "step_p50_ms": med["step_p50_ms"],
                     "tokens_per_s": 1e3 / per_token})
    base = next((r["ms_per_token"] for r in rows if r["num_beams"] == 1), None)
    for r in rows:
        r["vs_one_beam"] = r["ms_per_token"] / base if base else None
    return rows


def beam_speeds(specs, s, log) -> dict[str, list[dict]]:
    """Beam search at batch 1: 1 and `s.beams` beams, interleaved, for each of our systems in `specs`
    (the benchmark's Settings `s`), in this process after the workers are gone."""
    from gpt2onnx.runtime import Engine

    out = {}
    for spec in (x for x in specs if x.kind == "ours"):
        log(f"beam search: {spec.name}")
        engine = Engine.load(spec.path, provider=spec.provider, threads=spec.threads or None, verify="size")
        out[spec.name] = measure(engine, (1, s.beams), s.prompt_len[0], s.new_tokens, s.repeats)
        del engine
    return out


def main(argv: list[str] | None = None) -> int:
    from gpt2onnx.runtime import Engine
    from gpt2onnx.runtime.sampling import MAX_BEAMS

    from .settings import ToolParser, int_list

    p = ToolParser(prog="python -m gpt2onnx.benchmarks.beam_speed", description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--beams", type=int_list, default="1,4", help="comma list of beam counts (default 1,4)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="intra-op threads (default one per core)")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args(argv)
    p.at_least(a, prompt_len=1, new_tokens=1, repeats=1)
    beams = tuple(a.beams)
    if not beams or not all(1 <= k <= MAX_BEAMS for k in beams):
        p.error(f"--beams takes comma-separated beam counts from 1 to {MAX_BEAMS}, got {','.join(map(str, a.beams))}")
    p.output_file(a.json, "--json")
    engine = p.run(Engine.load, a.artifact, provider=a.provider, threads=a.threads)
    rows = p.run(measure, engine, beams, a.prompt_len, a.new_tokens, a.repeats)
    print(f"{'beams':>5} {'prefill ms':>10} {'ms/token':>9} {'step p50 ms':>11} {'tokens/s':>8} {'vs 1 beam':>9}")
    for r in rows:
        ratio = f"{r['vs_one_beam']:.2f}x" if r["vs_one_beam"] else "-"
        print(f"{r['num_beams']:>5} {r['prefill_ms']:>10.1f} {r['ms_per_token']:>9.2f} {r['step_p50_ms']:>11.2f} "
              f"{r['tokens_per_s']:>8.1f} {ratio:>9}")
    if a.json:
        from .results import write_json

        write_json(a.json, {"artifact": a.artifact, "provider": engine.provider, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
