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
  logits   the [b, vocab] float32 logits copied to the host array greedy reads
  argmax   numpy argmax over them: greedy's pick on the host
  prompt   a 32-token prompt pass on one empty row (uncaptured, as every prompt pass runs): what a
           scheduler's decode rows wait when a new request's prompt runs between two of their steps
  chunk    the same 32 tokens as one fixed 64-column chunk (Decoder.chunk, captured under CUDA graphs):
           what they wait instead with SchedulerConfig.prompt_width 64

Then the device variants the issue asked to consider: the artifact's graph with greedy's pick added
as a second int64 output (`ArgMax` over the logits, or `TopK` k=1), built in memory from the same
weights, run the same way: is it captured (a session with enable_cuda_graph that runs), its run ms,
the [b] ids copied back, and whether they equal the host argmax of the same step's logits. A variant
that onnxruntime refuses is recorded with its error, not raised. (The exported graph's attention
had a padding bias until its step was measured here beside the graph without it: 1.07-1.59x faster
replays on an H200, reports/gpu/attention-bias, the tool as of commit b58c4c0.)

Nothing here changes what the runtime ships: it measures, so the next change is chosen by figures.
On the cpu provider everything runs without capture (what the tests exercise on the tiny artifact).
Writes DIR/step.json and DIR/step.md; the JSON is rewritten after each section, so a crash in a
variant leaves the sections before it.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import numpy as np

from .gpu_check import CHUNK, write_record
from .workloads import prompt_rows

PROMPT = 32
WARMUP = 10
STEPS = 100
PICKS = {"ArgMax": {"axis": -1, "keepdims": 0}, "TopK": {"axis": -1}}  # the ops tried for greedy's pick in the graph
PICK_OUTPUT = "next_token"


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
        def fetch():
            dec.logits[:bb] = device_logits.numpy()
        out["logits_ms"] = _median_ms(fetch, steps)
    else:
        out["logits_ms"] = 0.0  # the CPU graph writes the host array itself
    out["argmax_ms"] = _median_ms(lambda: dec.logits[:b, 0].argmax(-1), steps)
    out["host_ms"] = out["step_ms"] - out["run_ms"] - out["inputs_ms"] - out["logits_ms"]  # decode's own numpy work
    out["prompt_ms"] = _prompt_ms(dec, e.vocab_size, steps)
    out["chunk_ms"] = _prompt_ms(dec, e.vocab_size, steps, chunk=True)
    dec.close()
    return out


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


def _variant_model(artifact: str, op: str):
    """The artifact's graph with greedy's pick over its logits as a second output, int64 [batch, kept]."""
    import onnx
    from onnx import TensorProto, helper

    from gpt2onnx.runtime.artifact import load_manifest

    m = load_manifest(artifact, verify="size")
    model = onnx.load(m.file("model.onnx"))  # with the weights: the variant session is built from bytes
    logits = m.raw["io"]["names"]["logits"]
    g = model.graph
    if op == "ArgMax":
        g.node.append(helper.make_node("ArgMax", [logits], [PICK_OUTPUT], name="greedy_pick", **PICKS[op]))
    else:
        g.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), "pick_k"))
        g.node.append(helper.make_node("TopK", [logits, "pick_k"], ["pick_value", "pick_index"], name="greedy_topk", **PICKS[op]))
        g.node.append(helper.make_node("Squeeze", ["pick_index", "pick_axes"], [PICK_OUTPUT], name="greedy_pick"))
        g.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), "pick_axes"))
    g.output.append(helper.make_tensor_value_info(PICK_OUTPUT, TensorProto.INT64, ["batch", "kept"]))
    return model.SerializeToString()


def _variant_session(e, artifact: str, op: str):
    """A session of the variant graph, made as the engine's (enable_cuda_graph where the engine captures)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    from gpt2onnx.runtime.session import cuda_options

    providers = [(e.provider, cuda_options(bool(e.cuda_graph)))] if e.device == "cuda" else [e.provider]
    return ort.InferenceSession(_variant_model(artifact, op), so, providers=providers)


def _variant(e, sess, ids, op: str, b: int, steps: int) -> dict:
    """One device pick variant at batch b: captured?, timed, ids checked against the host argmax."""
    import onnxruntime as ort

    from gpt2onnx.runtime.decoder import Decoder

    out = {"op": op, "batch": b}
    try:
        captured = bool(e.cuda_graph)
        dec = Decoder(e.spec, sess, b, e.n_positions, e.device, graph_id=(lambda: next(ids)) if captured else None,
                      session_graphs=captured)
        dec.prefill(0, prompt_rows(b, PROMPT, e.vocab_size))
        bb = dec.batch_for(b)
        io, copies, device_logits, ro = dec._binding(0, bb, 1)
        pick = ort.OrtValue.ortvalue_from_shape_and_type([bb, 1], np.int64, e.device, 0)
        io.bind_ortvalue_output(PICK_OUTPUT, pick)  # before the first run: the capture records it
        tokens = np.zeros(b, np.int64)
        equal = 0
        for _ in range(8):  # the first run captures; then the device pick against the host argmax
            logits = dec.decode(tokens)
            got = pick.numpy()[:b, 0]
            equal += int(np.array_equal(got, logits.argmax(-1)))
            tokens = got
        out["ids_equal_host_argmax"] = f"{equal}/8 steps"
        out["captured"] = captured
        out["run_ms"] = _median_ms(lambda: sess.run_with_iobinding(io, ro), min(steps, (e.n_positions - PROMPT - 40) // 2))
        out["pick_copy_ms"] = _median_ms(lambda: pick.numpy(), steps)
        dec.close()
    except Exception as err:  # onnxruntime raises its own types; the figure is whether it runs at all
        out["error"] = _error(err)
    return out


def _error(err: Exception) -> str:
    """An exception as one line for the record: its type and the first line of its message."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300] if text else ''}"


def measure(artifact: str, provider: str, batches: list[int], steps: int = STEPS, log=print, save=None) -> dict:
    import onnxruntime as ort

    from gpt2onnx.runtime import Engine

    e = Engine.load(artifact, provider=provider, verify="size")
    m = e.manifest.raw
    r = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "artifact": artifact,
         "checkpoint": m.get("source", {}).get("checkpoint"), "precision": m.get("precision"), "provider": e.provider,
         "onnxruntime": ort.__version__, "session_cuda_graph": bool(e.cuda_graph), "prompt": PROMPT,
         "parts": [], "variants": []}
    for b in batches:
        log(f"step parts at batch {b}")
        r["parts"].append(_parts(e, b, steps))
        save and save(r)
    for op in PICKS:
        log(f"device pick {op}: building its session")
        try:
            sess, ids = _variant_session(e, artifact, op), itertools.count(1)  # graph ids drawn per session
        except Exception as err:  # onnxruntime raises its own types; a refused variant is a finding
            r["variants"].append({"op": op, "batch": batches[0], "error": _error(err)})
            continue
        for b in batches:
            log(f"device pick {op} at batch {b}")
            r["variants"].append(_variant(e, sess, ids, op, b, steps))
            save and save(r)
        del sess
    return r


def render(r: dict) -> list[str]:
    L = [f"{r['created']} · {r['checkpoint']} {r['precision']} · provider {r['provider']} · onnxruntime {r['onnxruntime']} · "
         f"session with enable_cuda_graph: {'yes' if r['session_cuda_graph'] else 'no'}", "",
         f"Each part timed alone, medians over the steps shown, after {WARMUP} warm-up repetitions; rows prefilled with "
         f"{r['prompt']}-token prompts. host = step - run - inputs - logits: the Decoder's own numpy work.", "",
         f"prompt = a {r['prompt']}-token prompt pass on one row (uncaptured); chunk = the same tokens as one "
         f"{CHUNK}-column chunk (Decoder.chunk: a fixed shape, captured where the session captures).", "",
         "| batch | bucket | steps | step ms | run ms | inputs ms | logits ms | host ms | + argmax ms (numpy) | prompt ms | chunk ms |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["parts"]:
        L.append(f"| {p['batch']} | {p['bucket']} | {p['steps']} | {p['step_ms']:.3f} | {p['run_ms']:.3f} | {p['inputs_ms']:.3f} | "
                 f"{p['logits_ms']:.3f} | {p['host_ms']:.3f} | {p['argmax_ms']:.3f} | {p.get('prompt_ms', float('nan')):.3f} | "
                 f"{p.get('chunk_ms', float('nan')):.3f} |")
    if r["variants"]:
        L += ["", "Greedy's pick in the graph (a second int64 output over the logits; the logits stay on the device):", "",
              "| op | batch | runs | run ms | ids copy ms | ids equal host argmax |", "|---|---|---|---|---|---|"]
        for v in r["variants"]:
            if "error" in v:
                L.append(f"| {v['op']} | {v['batch']} | **no**: {v['error']} | | | |")
            else:
                L.append(f"| {v['op']} | {v['batch']} | yes{' (captured)' if v['captured'] else ''} | {v['run_ms']:.3f} | "
                         f"{v['pick_copy_ms']:.3f} | {v['ids_equal_host_argmax']} |")
    return L


def write(r: dict, out: str) -> None:
    write_record(out, "step", "Where a decode step's time goes", r, render(r))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt2onnx.benchmarks.gpu_step", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", metavar="ARTIFACT_DIR")
    p.add_argument("--out", required=True, help="directory for step.json and step.md")
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help="cpu runs every part without capture (tests)")
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--steps", type=int, default=STEPS, help="timed repetitions per part")
    return p


def main(argv: list[str] | None = None) -> None:
    from gpt2onnx.runtime.errors import Gpt2OnnxError

    p = parser()
    a = p.parse_args(argv)
    try:
        batches = [int(x) for x in a.batch.split(",") if x.strip()]
    except ValueError:
        p.error(f"--batch takes comma-separated integers, got {a.batch!r}")
    if not batches or min(batches) < 1 or a.steps < 1:
        p.error("--batch needs sizes >= 1 and --steps >= 1")
    try:
        r = measure(a.artifact, a.provider, batches, a.steps, log=lambda m: print(m, file=sys.stderr, flush=True),
                    save=lambda r: write(r, a.out))
    except Gpt2OnnxError as e:
        sys.exit(f"error: {e}")
    write(r, a.out)
    print("\n".join(render(r)))


if __name__ == "__main__":
    main()
