"""Where a decode step's time goes, part by part, and whether greedy's pick can move onto the device.

    python -m gpt2onnx.benchmarks.gpu_step ARTIFACT_DIR --out DIR [--provider cuda|cpu] [--batch 1,64]

For each batch size b, a Decoder of b rows over the engine's session (captured where the session
was created with enable_cuda_graph, as Engine.generate runs it) is prefilled with b prompts of 32
tokens, then each part of a step is timed alone over STEPS repetitions after a warm-up (medians):

  step     Decoder.decode end to end: what a greedy token costs below the sampler
  inputs   refreshing the step's device inputs (update_inplace: ids [b, 1], positions [b, 1], the
           [b, capacity] mask): host-to-device copies from pageable memory
  run      session.run_with_iobinding alone on the step's binding: the graph's replay (or the
           uncaptured run) with onnxruntime's call overhead and its synchronisation
  logits   the [b, vocab] float32 logits copied to the host (OrtValue.numpy: one copy into a new array;
           until 2026-12-06 a second copy into the Decoder's own array followed)
  argmax   numpy argmax over them: greedy's pick on the host
  prompt   a 32-token prompt pass on one empty row (uncaptured, as every prompt pass runs): what a
           scheduler's decode rows wait when a new request's prompt runs between two of their steps
  chunk    the same 32 tokens as one fixed 64-column chunk (Decoder.chunk, captured under CUDA graphs):
           what they wait instead with SchedulerConfig.prompt_width 64
  mixed    where the artifact has mixed.onnx (export --mixed-step): a greedy step over the b rows with
           that chunk inside its pass, on one more row (Decoder.decode_with_chunk, captured): what they
           wait with prompt_width 64 and the mixed step, against step + argmax + chunk

and greedy's pick on the device (the artifact's pick.onnx, runtime/decoder.py Pick), at every batch
whatever the runtime's PICK_FROM says, so its threshold can be set by these figures:

  device   Decoder's step with the pick: the run, the pick's own (captured) run, the [b] ids copied
           back; against step + argmax, greedy on the host
  pick     the pick's run alone
  equal    over 8 steps, the pick's ids against numpy's argmax of the same step's logits

(Before pick.onnx, this tool measured the pick as a second output of the decoder graph: ArgMax 1.131
vs 1.036 ms per run at batch 1, 2.081 vs 1.986 at 64 on an H200, reports/gpu/step.md of 2026-12-04;
onnxruntime runs every node whatever is bound, so batch 1 would pay it on every step. The exported
graph's attention had a padding bias until its step was measured here beside the graph without it:
1.07-1.59x faster replays, reports/gpu/attention-bias, the tool as of commit b58c4c0.)

Nothing here changes what the runtime ships: it measures, so the next change is chosen by figures.
On the cpu provider everything runs without capture (what the tests exercise on the tiny artifact).
Writes DIR/step.json and DIR/step.md; the JSON is rewritten after each section, so a crash in a
variant leaves the sections before it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from .gpu_check import CHUNK, write_record
from .workloads import prompt_rows

PROMPT = 32
WARMUP = 10
STEPS = 100


def _median_ms(fn, n: int) -> float:
    for _ in range(WARMUP):
        fn()
    t = []
    for _ in range(n):
        s = time.perf_counter()
        fn()
        t.append(time.perf_counter() - s)
    return float(np.median(t)) * 1e3


def _parts(e, b: int, steps: int) -> dict:
    """The parts of one step over b rows of a fresh Decoder, each timed alone."""
    cap = e.n_positions
    dec = e.decoder(b, cap)
    dec.prefill(0, prompt_rows(b, PROMPT, e.vocab_size))  # b rows from empty, in one pass
    tokens = np.zeros(b, np.int64)
    # every timed decode advances the rows; the budget keeps them inside the cache
    steps = min(steps, (cap - PROMPT - 2 * WARMUP - 4) // 2)
    bb = dec.batch_for(b)  # the bucket the step runs
    out = {"batch": b, "steps": steps, "bucket": bb}
    out["step_ms"] = _median_ms(lambda: dec.decode(tokens), steps)
    # the step's own binding, as decode made it (private on purpose: this tool takes the step apart)
    io, copies, device_logits, ro = dec._binding(0, bb, 1)
    out["inputs_ms"] = _median_ms(lambda: [ov.update_inplace(h) for h, ov in copies], steps) if copies else 0.0
    out["run_ms"] = _median_ms(lambda: e.session.run_with_iobinding(io, ro), steps)
    if device_logits is not None:
        out["logits_ms"] = _median_ms(device_logits.numpy, steps)  # one copy into a new host array, as _run does
    else:
        out["logits_ms"] = 0.0  # the CPU graph writes the host array itself
    out["argmax_ms"] = _median_ms(lambda: dec.logits[:b, 0].argmax(-1), steps)
    out["host_ms"] = out["step_ms"] - out["run_ms"] - out["inputs_ms"] - out["logits_ms"]  # decode's own numpy work
    out["prompt_ms"] = _prompt_ms(dec, e.vocab_size, steps)
    out["chunk_ms"] = _prompt_ms(dec, e.vocab_size, steps, chunk=True)
    if dec.pick is not None:
        _pick(dec, device_logits, b, bb, steps, out)
    dec.close()
    if e._mixed() is not None:
        out["mixed_ms"] = _mixed_ms(e, b, steps)  # the same rows' budget of steps
    return out


def _mixed_ms(e, b: int, steps: int) -> float:
    """A greedy step over b rows with a PROMPT-token chunk of CHUNK columns inside its pass (the mixed step
    graph), the chunk on row b (emptied before each), as the scheduler runs it with prompt_width CHUNK."""
    dec = e.decoder(b + 1, e.n_positions, mixed=True)
    dec.prefill(0, prompt_rows(b, PROMPT, e.vocab_size))
    row = prompt_rows(1, PROMPT, e.vocab_size)[0]
    tokens, live = np.zeros(b, np.int64), np.ones(b, bool)

    def one():
        dec.truncate(b, 0)
        dec.decode_with_chunk(tokens, live, b, row, CHUNK, greedy=True)
    try:
        return _median_ms(one, steps)
    finally:
        dec.close()


def _pick(dec, device_logits, b: int, bb: int, steps: int, out: dict) -> None:
    """The step with greedy's pick on the device (Decoder._step with pick, at any batch), its run alone,
    and its ids against numpy's argmax of the same step's logits."""
    for r in range(dec.slots):  # start over: the parts above advanced the rows
        dec.truncate(r, 0)
    dec.prefill(0, prompt_rows(b, PROMPT, dec.spec.vocab_size))
    tokens, equal = np.zeros(b, np.int64), 0
    for _ in range(8):  # the first runs capture; each step's logits stay where the graph wrote them
        ids = dec._step(tokens, None, pick=True)[:b].copy()
        logits = (dec.logits[:bb] if device_logits is None else device_logits.numpy())[:b, 0]
        equal += int(np.array_equal(ids, logits.argmax(-1)))
        tokens = ids
    if dec.pick.broken:  # the Decoder fell back to the host: no device figure to report
        out["pick_error"] = dec.pick.broken
        return
    out["pick_equal"] = f"{equal}/8 steps"
    out["device_ms"] = _median_ms(lambda: dec._step(tokens, None, pick=True), steps)
    binding = dec._picks[(dec._set, 0, bb, 1)]
    out["pick_ms"] = _median_ms(lambda: dec.pick.run(binding), steps)


def _prompt_ms(dec, vocab: int, steps: int, chunk: bool = False) -> float:
    """A PROMPT-token prompt pass on row 0, emptied before each: uncaptured, as prompt passes run, or
    (chunk) as one CHUNK-column chunk, whose fixed shape is captured under CUDA graphs."""
    row = prompt_rows(1, PROMPT, vocab)

    def one():
        dec.truncate(0, 0)
        if chunk:
            dec.chunk(0, row[0], CHUNK)
        else:
            dec.prefill(0, row)
    return _median_ms(one, min(steps, 50))


def record_header(e, artifact: str) -> dict:
    """What a GPU tool's record (this one's, gpu_kernels') says first: when, which artifact, and the
    session it measured."""
    import onnxruntime as ort

    m = e.manifest.raw
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "artifact": artifact,
            "checkpoint": m.get("source", {}).get("checkpoint"), "precision": m.get("precision"), "provider": e.provider,
            "onnxruntime": ort.__version__, "session_cuda_graph": bool(e.cuda_graph)}


def measure(artifact: str, provider: str, batches: list[int], steps: int = STEPS, log=print, save=None) -> dict:
    from gpt2onnx.runtime import Engine
    from gpt2onnx.runtime.artifact import load_manifest
    from gpt2onnx.runtime.decoder import PICK_FROM
    from gpt2onnx.runtime.errors import one_line
    from gpt2onnx.runtime.spec import ModelSpec

    spec = ModelSpec.from_manifest(load_manifest(artifact, verify="size"))
    has_pick = spec.has_pick  # measured on every provider where the artifact has one, as the mixed step is
    e = Engine.load(artifact, provider=provider, verify="size", device_pick=has_pick or None, mixed_step=spec.has_mixed or None)
    r = {**record_header(e, artifact), "prompt": PROMPT, "pick": has_pick, "pick_from": PICK_FROM, "parts": [],
         "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ORT_")}}  # onnxruntime's kernel switches
    for b in batches:
        log(f"step parts at batch {b}")
        try:
            r["parts"].append(_parts(e, b, steps))
        except Exception as err:  # onnxruntime raises its own types; the batch's failure is the finding
            r["parts"].append({"batch": b, "error": one_line(err)})
        save and save(r)
    return r


def render(r: dict) -> list[str]:
    L = [f"{r['created']} · {r['checkpoint']} {r['precision']} · provider {r['provider']} · onnxruntime {r['onnxruntime']} · "
         f"session with enable_cuda_graph: {'yes' if r['session_cuda_graph'] else 'no'}"
         + "".join(f" · {k}={v}" for k, v in r.get("env", {}).items()), "",
         f"Each part timed alone, medians over the steps shown, after {WARMUP} warm-up repetitions; rows prefilled with "
         f"{r['prompt']}-token prompts. host = step - run - inputs - logits: the Decoder's own numpy work.", "",
         f"prompt = a {r['prompt']}-token prompt pass on one row (uncaptured); chunk = the same tokens as one "
         f"{CHUNK}-column chunk (Decoder.chunk: a fixed shape, captured where the session captures); mixed = a greedy "
         f"step with that chunk inside its pass (mixed.onnx; - where the artifact has none).", "",
         "| batch | bucket | steps | step ms | run ms | inputs ms | logits ms | host ms | + argmax ms (numpy) | prompt ms | chunk ms "
         "| mixed ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["parts"]:
        if "error" in p:
            L.append(f"| {p['batch']} | **failed**: {p['error']} |")
            continue
        mixed = f"{p['mixed_ms']:.3f}" if "mixed_ms" in p else "-"
        L.append(f"| {p['batch']} | {p['bucket']} | {p['steps']} | {p['step_ms']:.3f} | {p['run_ms']:.3f} | {p['inputs_ms']:.3f} | "
                 f"{p['logits_ms']:.3f} | {p['host_ms']:.3f} | {p['argmax_ms']:.3f} | {p.get('prompt_ms', float('nan')):.3f} | "
                 f"{p.get('chunk_ms', float('nan')):.3f} | {mixed} |")
    picks = [p for p in r["parts"] if "device_ms" in p]
    if picks:
        L += ["", f"Greedy's pick on the device (pick.onnx: ArgMax over the step's logits where they lie, its own session"
              f"{', captured' if r['session_cuda_graph'] else ''}); the runtime takes it from {r['pick_from']} rows up. "
              "host = step + numpy's argmax; device = the step with the pick, only the ids copied back.", "",
              "| batch | greedy on host ms | greedy on device ms | device ÷ host | pick run ms | ids equal host argmax |",
              "|---|---|---|---|---|---|"]
        for p in picks:
            host = p["step_ms"] + p["argmax_ms"]
            L.append(f"| {p['batch']} | {host:.3f} | {p['device_ms']:.3f} | {p['device_ms'] / host:.2f} | {p['pick_ms']:.3f} | "
                     f"{p['pick_equal']} |")
    failed = [f"- greedy's pick on the device at batch {p['batch']}: **failed** ({p['pick_error']}); the runtime falls "
              "back to the host" for p in r["parts"] if "pick_error" in p]
    L += [""] + failed if failed else []
    if not picks and not r.get("pick"):
        L += ["", "The artifact has no pick.onnx (exported before 2026-12-06): greedy's device pick not measured."]
    return L + itl_estimate(r["parts"])


def itl_estimate(parts: list[dict], rows: int = 16) -> list[str]:
    """What these parts say of issue 19's scheduler bar (p99 inter-token latency at 16 clients <= 3x the
    batch-1 step): while prompts arrive, most of a decoding row's gaps hold one decode step of `rows` rows
    and one prompt pass between two steps (a chunk of CHUNK columns with prompt_width, else a prompt pass of
    its own shape), so the p99 gap is near their sum. The lines to read before the concurrent scenario's."""
    by = {p["batch"]: p for p in parts if "error" not in p}
    one, many = by.get(1), by.get(rows)
    if not one or not many:
        return []
    step = many.get("device_ms", many["step_ms"] + many["argmax_ms"])  # greedy, as the scenario's requests are
    base = one["step_ms"] + one["argmax_ms"]
    L = ["", f"Scheduler bar, estimated from these parts: a gap of a {rows}-row greedy step "
         f"({'device' if 'device_ms' in many else 'host'} pick) {step:.3f} ms plus one prompt pass between two steps, "
         f"against 3x the batch-1 greedy step ({3 * base:.3f} ms):", ""]
    for what, key in ((f"{CHUNK}-column chunk (prompt_width {CHUNK}, captured)", "chunk_ms"),
                      (f"{PROMPT}-token prompt pass (uncaptured)", "prompt_ms")):
        if key in many:
            gap = step + many[key]
            L.append(f"- with a {what}: {gap:.3f} ms = **{gap / base:.2f}x** the batch-1 step")
    if "mixed_ms" in many:  # the chunk inside the step's pass: the gap is that one pass
        L.append(f"- with the {CHUNK}-column chunk inside the step's pass (mixed.onnx): {many['mixed_ms']:.3f} ms = "
                 f"**{many['mixed_ms'] / base:.2f}x** the batch-1 step")
    return L


def write(r: dict, out: str) -> None:
    write_record(out, "step", "Where a decode step's time goes", r, render(r))


def batch_parser(prog: str, doc: str, files: str, default_batch: str, steps: int) -> argparse.ArgumentParser:
    """The command line of a per-batch GPU tool (this one, gpu_kernels): an artifact, --out, --provider,
    --batch, --steps."""
    from .settings import ToolParser, int_list

    p = ToolParser(prog=f"python -m gpt2onnx.benchmarks.{prog}", description=doc.split("\n\n")[0])
    p.add_argument("artifact", metavar="ARTIFACT_DIR")
    p.add_argument("--out", required=True, help=f"directory for {files}")
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help="cpu runs without capture (tests)")
    p.add_argument("--batch", type=int_list, default=default_batch, help=f"comma-separated batch sizes (default {default_batch})")
    p.add_argument("--steps", type=int, default=steps, help="timed or profiled steps per batch")
    return p


def batch_main(p: argparse.ArgumentParser, argv: list[str] | None, measure, write, render) -> None:
    """Parse, check the batch sizes (a usage error names --batch), measure with the JSON rewritten after
    each batch, write, print the rendering; an artifact the runtime refuses is one line and exit 1."""
    from gpt2onnx.runtime.errors import Gpt2OnnxError

    a = p.parse_args(argv)
    batches = a.batch
    if not batches or min(batches) < 1 or a.steps < 1:
        p.error("--batch needs sizes >= 1 and --steps >= 1")
    p.output_dir(a.out)  # before the measuring, not a FileExistsError after it
    try:
        r = measure(a.artifact, a.provider, batches, a.steps, log=lambda m: print(m, file=sys.stderr, flush=True),
                    save=lambda r: write(r, a.out))
    except Gpt2OnnxError as e:
        sys.exit(f"error: {e}")
    write(r, a.out)
    print("\n".join(render(r)))


def parser() -> argparse.ArgumentParser:
    return batch_parser("gpu_step", __doc__, "step.json and step.md", "1,4,16,64", STEPS)


def main(argv: list[str] | None = None) -> None:
    batch_main(parser(), argv, measure, write, render)


if __name__ == "__main__":
    main()
