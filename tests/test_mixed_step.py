"""The mixed step graph (export --mixed-step, mixed.onnx): a decode step and one row's prompt chunk in
one pass. Its results must be those of the chunk pass and the step run one after the other, in the
decode core and through the scheduler, and the artifact must hold its weights once."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gpt2onnx.runtime import Engine
from gpt2onnx.runtime.errors import Gpt2OnnxError
from gpt2onnx.runtime.scheduler import Scheduler, SchedulerConfig

from .conftest import assert_one_line_error, captured, run_cli

PROMPTS = [[5, 6, 7, 8], [9, 10], [1, 2, 3, 4, 5, 6, 7], [11, 12, 13]]


def _workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 50000, size=int(rng.integers(1, 40))).tolist(), int(rng.integers(1, 16))) for _ in range(n)]


def _pair(path: str, graphs: bool):
    """Two decode cores over the same artifact, rows 0-3 prefilled alike: one with the mixed graph, one without."""
    e = captured(path, mixed_step=True) if graphs else Engine.load(path, provider="cpu", mixed_step=True)
    ours, ref = e.decoder(5, 64, mixed=True), e.decoder(5, 64)
    assert ours.mixed is not None and ref.mixed is None
    for dec in (ours, ref):
        for r, p in enumerate(PROMPTS):
            dec.prefill(r, [p])
    return ours, ref


@pytest.mark.parametrize("graphs", [False, True], ids=["plain", "cuda-graph-path"])
@pytest.mark.parametrize("row, width, length", [(1, 8, 8), (1, 8, 3), (4, 8, 5)], ids=["in-bucket", "short", "outside"])
def test_mixed_pass_equals_a_chunk_then_a_step(tiny_mixed_artifact, graphs, row, width, length):
    """Row `row` takes its prompt in chunks beside steps over rows 0, 2, 3 (row 1 sits inside the step's
    rows as an idle row; row 4 outside them): the step's logits, the chunk's last logits, every row's
    length and mask, and the steps after, equal those of a chunk pass then a step."""
    ours, ref = _pair(tiny_mixed_artifact, graphs)
    tokens, live = np.array([30, 0, 31, 33]), np.array([True, False, True, True])
    if row == 4:
        ref.prefill(4, [[40]]), ours.prefill(4, [[40]])
    for k in range(3):
        chunk = [20 + 7 * k + i for i in range(length)]
        step, last = ours.decode_with_chunk(tokens, live, row, chunk, width)
        step, last = step.copy(), last.copy()
        want_last = ref.chunk(row, chunk, width).copy()
        want = ref.decode(tokens, live).copy()
        np.testing.assert_allclose(step[live], want[live], atol=1e-5, rtol=0)
        np.testing.assert_allclose(last, want_last, atol=1e-5, rtol=0)
        assert np.array_equal(ours.held, ref.held)
        for r, h in enumerate(ours.held):  # each row attends to exactly what it holds (an idle row's 1 past it aside)
            assert ours.mask[r, :h].all() and not ours.mask[r, h + 1:].any(), r
        tokens = want.argmax(-1)
    everyone = np.array([1, 2, 3, 4, 5])
    np.testing.assert_allclose(ours.decode(everyone), ref.decode(everyone), atol=1e-5, rtol=0)
    assert ours.mixed.runs == 3


def test_mixed_pass_greedy_returns_ids(tiny_mixed_artifact):
    ours, ref = _pair(tiny_mixed_artifact, False)
    tokens, live = np.array([30, 0, 31]), np.array([True, False, True])
    ids, last = ours.decode_with_chunk(tokens, live, 1, [7, 8], 4, greedy=True)
    want_last = ref.chunk(1, [7, 8], 4).copy()
    assert ids.shape == (3,) and np.array_equal(ids[live], ref.decode(tokens, live).argmax(-1)[live])
    np.testing.assert_allclose(last, want_last, atol=1e-5, rtol=0)
    # a chunk that does not end its prompt: its logits are not fetched (on CUDA they stay on the device)
    assert ours.decode_with_chunk(ids, live, 1, [9], 4, greedy=True, last=False)[1] is None


def test_mixed_pass_refuses_what_it_cannot_run(tiny_mixed_artifact):
    """A decoding row cannot take a chunk in the same pass; a chunk beside the step needs its width plus
    the idle write's column free in the row; a chunk holds 1 .. width tokens."""
    e = Engine.load(tiny_mixed_artifact, provider="cpu", mixed_step=True)
    dec = e.decoder(2, 12, mixed=True)
    dec.prefill(0, [[1, 2, 3]])
    dec.prefill(1, [[4, 5, 6]])
    with pytest.raises(ValueError, match="row 1 decodes this step"):
        dec.decode_with_chunk(np.array([7, 8]), np.array([True, True]), 1, [9], 4)
    # 3 tokens held of 12: outside the step's rows 9 columns fit, inside them 8 (the 9th column is the idle write's)
    assert dec.can_mix(1, 9, 1) and not dec.can_mix(1, 10, 1) and dec.can_mix(1, 8, 2) and not dec.can_mix(1, 9, 2)
    with pytest.raises(Gpt2OnnxError, match="9-column chunk does not fit beside the step after the 3 tokens of a 12-position row"):
        dec.decode_with_chunk(np.array([7, 0]), np.array([True, False]), 1, [9], 9)
    with pytest.raises(ValueError, match="a 2-column chunk takes 1 to 2 tokens, got 3"):
        dec.decode_with_chunk(np.array([7]), np.array([True]), 1, [1, 2, 3], 2)
    assert e.decoder(2, 12).can_mix(1, 1, 1) is False  # not asked for: no mixed graph


@pytest.mark.parametrize("mode", ["plain", "cuda-graph-path", "device-pick"])
def test_scheduler_runs_prompt_chunks_in_the_step(tiny_mixed_artifact, monkeypatch, mode):
    """With a prompt width and the mixed graph, a prompt chunk rides in the decode step's pass: every
    request gets exactly its tokens alone, and most chunks rode (a chunk runs alone only where no row
    decodes or the row lacks the idle write's column)."""
    from gpt2onnx.runtime.decoder import Decoder

    e = {"plain": lambda p: Engine.load(p, provider="cpu", mixed_step=True), "cuda-graph-path": lambda p: captured(p, mixed_step=True),
         "device-pick": lambda p: captured(p, device_pick=True, mixed_step=True)}[mode](tiny_mixed_artifact)
    alone_chunks = []
    real = Decoder.chunk
    monkeypatch.setattr(Decoder, "chunk", lambda self, *a: (alone_chunks.append(a), real(self, *a))[1])
    work = _workload(20, seed=5)
    expected = [e.generate([p], max_new_tokens=n, eos_token_id=-1)[0] for p, n in work]
    with Scheduler(e, SchedulerConfig(max_batch=6, max_queue=64, prompt_width=8, prefill_chunk=8)) as s:
        got = [h.result(timeout=120).tokens for h in [s.submit(p, max_new_tokens=n, eos_token_id=-1) for p, n in work]]
        rode = s.kv.mixed.runs
    assert got == expected
    assert rode > 2 * len(alone_chunks) and rode >= 10, (rode, len(alone_chunks))
    if mode == "device-pick":
        assert e.pick.runs > 0


def test_when_the_scheduler_takes_the_mixed_step(tiny_mixed_artifact):
    """The mixed graph is for fixed-width chunks: no prompt width, no mixed session (not even built);
    SchedulerConfig.mixed_step=False keeps it off; on the CPU the engine takes it only when asked
    (mixed_step=True: by default it is a CUDA feature), and mixed_step=False never."""
    e = Engine.load(tiny_mixed_artifact, provider="cpu", mixed_step=True)
    with Scheduler(e, SchedulerConfig(max_batch=2)) as s:
        assert s.kv.mixed is None and s.submit([1, 2, 3], max_new_tokens=2).result(timeout=60).tokens
    assert e._mixed_step is False  # never built
    with Scheduler(e, SchedulerConfig(max_batch=2, prompt_width=8, mixed_step=False)) as s:
        assert s.kv.mixed is None
    with Scheduler(e, SchedulerConfig(max_batch=2, prompt_width=8)) as s:
        assert s.kv.mixed is not None
    for asked in (None, False):
        other = Engine.load(tiny_mixed_artifact, provider="cpu", mixed_step=asked)
        assert other.session_config.mixed_step is False
        with Scheduler(other, SchedulerConfig(max_batch=2, prompt_width=8)) as s:
            assert s.kv.mixed is None


def test_mixed_step_required_but_missing(tiny_artifact):
    with pytest.raises(Gpt2OnnxError, match="has no mixed step graph .*re-export it with --mixed-step"):
        Engine.load(tiny_artifact, provider="cpu", mixed_step=True)


def test_export_shares_the_weights_and_checks_the_mixed_graph(tiny_mixed_artifact):
    """mixed.onnx is listed and checked like every file, holds no weights of its own (every large tensor
    points into model.onnx.data, the bytes model.onnx reads), and its parity figure is in the manifest."""
    import onnx

    m = json.load(open(os.path.join(tiny_mixed_artifact, "gpt2onnx.json")))
    assert {"mixed.onnx", "model.onnx.data"} <= set(m["files"]) and "mixed.onnx.data" not in m["files"]
    assert not os.path.exists(os.path.join(tiny_mixed_artifact, "mixed.onnx.data"))
    assert m["files"]["mixed.onnx"]["bytes"] < 100_000 < m["files"]["model.onnx.data"]["bytes"]
    fig = m["parity"]["mixed_vs_model"]
    from gpt2onnx.export import parity

    assert fig["max_abs_logit_diff"] <= fig["tolerance"] == parity.TOLERANCES["fp32"]["max_abs_logit_diff"] and fig["passes"] == 3
    locations = lambda g: {t.name: {e.key: e.value for e in t.external_data}  # noqa: E731
                           for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    mixed = locations(onnx.load(os.path.join(tiny_mixed_artifact, "mixed.onnx"), load_external_data=False))
    model = locations(onnx.load(os.path.join(tiny_mixed_artifact, "model.onnx"), load_external_data=False))
    assert len(mixed) >= 10 and all(mixed[k] == model[k] for k in mixed)
    assert m["io"]["mixed"]["file"] == "mixed.onnx" and "mixed" in m["cuda_graph"]


def test_mixed_parity_catches_a_wrong_graph(tmp_path, tiny_mixed_artifact):
    """The export's check of the mixed graph fails a graph whose weights are not the model's."""
    from gpt2onnx.export import checkpoints, graph, parity

    ck = checkpoints.load("synthetic:tiny", 1)  # another seed: other weights
    cfg = graph.model_config(ck.model.config)
    onnx_path = str(tmp_path / "mixed.onnx")
    import onnx

    onnx.save(graph.build(cfg, graph.weights(ck.model, cfg), mixed=True), onnx_path)
    rows = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    model = parity.ort_session(os.path.join(tiny_mixed_artifact, "model.onnx"))
    assert parity.mixed_parity(model, os.path.join(tiny_mixed_artifact, "mixed.onnx"), cfg, "float32", rows)["max_abs_logit_diff"] < 1e-4
    assert parity.mixed_parity(model, onnx_path, cfg, "float32", rows)["max_abs_logit_diff"] > 0.01


def test_placement_keeps_the_fp16_mixed_graph_capturable():
    """On CUDA the mixed pass is captured like the step: the fp16 mixed graph needs no host<->device copy
    under onnxruntime's placement rules (export/placement.py); the split sizes stay shape arithmetic."""
    from gpt2onnx.export import checkpoints, graph
    from gpt2onnx.export.placement import predict

    ck = checkpoints.load("synthetic:tiny")
    cfg = graph.model_config(ck.model.config)
    p = predict(graph.build(cfg, graph.weights(ck.model, cfg), dtype="float16", mixed=True))
    assert p.capturable, [str(c) for c in p.copies]
    assert "split_bw" in p.on_cpu and not any("attn" in n for n in p.on_cpu)


def test_a_mixed_graph_reading_an_unlisted_file_is_refused(tmp_path, tiny_mixed_artifact):
    """Every .onnx the runtime opens has its external-data locations checked, mixed.onnx too."""
    import shutil

    import onnx

    from gpt2onnx.runtime.artifact import sha256

    art = tmp_path / "art"
    shutil.copytree(tiny_mixed_artifact, art)
    g = onnx.load(str(art / "mixed.onnx"), load_external_data=False)
    t = next(t for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in t.external_data if e.key == "location").value = "evil.bin"
    onnx.save(g, str(art / "mixed.onnx"))
    (art / "evil.bin").write_bytes(b"\0" * (1 << 20))
    m = json.loads((art / "gpt2onnx.json").read_text())
    m["files"]["mixed.onnx"] = {"bytes": os.path.getsize(art / "mixed.onnx"), "sha256": sha256(str(art / "mixed.onnx"))}
    (art / "gpt2onnx.json").write_text(json.dumps(m))
    with pytest.raises(Gpt2OnnxError, match="mixed.onnx in .* reads weights from 'evil.bin', which the manifest does not list"):
        Engine.load(str(art), provider="cpu")


def test_cli_mixed_step_needs_the_fused_graph(tmp_path):
    r = run_cli("export", "synthetic:tiny", "-o", str(tmp_path / "x"), "--mixed-step", "--no-fuse")
    assert_one_line_error(r, "--mixed-step needs the fused graph")
    assert not (tmp_path / "x").exists()


def test_scheduler_captures_every_pass_at_start(tiny_mixed_artifact):
    """Under CUDA graphs (the code path, on the CPU) a Scheduler binds, and so captures, every pass it can
    run when it starts: each bucket's step (and its device pick from PICK_FROM rows), each slot's chunk,
    and each bucket's mixed pass with each slot's chunk; its rows are empty after, and serving requests
    then makes no new binding, so no request waits on a capture. A plain engine captures nothing."""
    e = captured(tiny_mixed_artifact, device_pick=True, mixed_step=True)
    work = _workload(12, seed=9)
    expected = [e.generate([p], max_new_tokens=n, eos_token_id=-1)[0] for p, n in work]
    with Scheduler(e, SchedulerConfig(max_batch=6, prompt_width=8, prefill_chunk=8)) as s:
        kv = s.kv
        steps, mixed, picks = set(kv._steps), set(kv._mixed), set(kv._picks)
        assert not kv.held.any() and not kv.mask.any()
        buckets = {1, 2, 4, 6}
        assert {(f, b) for _, f, b, w in steps if w == 1} == {(0, b) for b in buckets}
        assert {(f, b) for _, f, b, w in steps if w == 8} == {(r, 1) for r in range(6)}
        assert {(b, r, w) for _, b, r, w in mixed} == {(b, r, 8) for b in buckets for r in range(6)}
        assert {k for k in picks if k[0] != "mixed"} == {(0, 0, b, 1) for b in (4, 6)}
        got = [h.result(timeout=120).tokens for h in [s.submit(p, max_new_tokens=n, eos_token_id=-1) for p, n in work]]
        assert (set(kv._steps), set(kv._mixed), set(kv._picks)) == (steps, mixed, picks)  # nothing captured while serving
    assert got == expected
    plain = Engine.load(tiny_mixed_artifact, provider="cpu", mixed_step=True)
    with Scheduler(plain, SchedulerConfig(max_batch=4, prompt_width=8)) as s:
        assert not s.kv._steps and not s.kv._mixed and s.kv.capture(8) == 0


def test_int8_dynamic_refuses_the_mixed_step(tmp_path, monkeypatch):
    """int8's dynamic quantization scales a pass's rows with one activation scale: in a mixed pass the idle
    chunk row attends over the chunk's columns before they are written, so every row's logits moved with
    memory nobody had written (measured: mixed vs model 0.34 to 0.46 from one run to the next on the same
    files; fixed 0.35 with the cache zeroed, 0.48 filled with 100). Exports refuse the pairing, per-row
    int8 (nbits) keeps it, and an artifact made before the refusal is refused the mixed step at load."""
    from gpt2onnx.export import convert

    r = run_cli("export", "synthetic:tiny", "-o", str(tmp_path / "x"), "--precision", "int8", "--mixed-step")
    assert_one_line_error(r, "--mixed-step needs per-row activations", "--int8-method nbits")
    assert not (tmp_path / "x").exists()
    monkeypatch.setattr(convert, "_check_options", lambda opts: None)  # an artifact from before the refusal
    old = convert.export(convert.ExportOptions("synthetic:tiny", str(tmp_path / "old"), precision="int8", mixed=True,
                                               enforce_tolerances=False), log=lambda *_: None)
    assert Engine.load(old, provider="cpu").generate([[5, 6, 7]], max_new_tokens=2)  # without the mixed step: fine
    with pytest.raises(Gpt2OnnxError, match="quantizes a pass's rows together .*--int8-method nbits"):
        Engine.load(old, provider="cpu", mixed_step=True)
    # int4 quantizes activations per row: it keeps the mixed step, whatever its measured batch invariance says
    # (False here: MatMulNBits sums in other orders per batch size)
    int4 = convert.export(convert.ExportOptions("synthetic:tiny", str(tmp_path / "int4"), precision="int4", mixed=True),
                          log=lambda *_: None)
    assert Engine.load(int4, provider="cpu", mixed_step=True).session_config.mixed_step


def test_mixed_pass_reads_no_unwritten_memory_where_rows_are_independent(tiny_mixed_artifact):
    """The same mixed passes over a cache filled with zeros and with large values give the same logits for
    every row that decodes and for the chunk: the idle chunk row's read of columns not yet written stays
    in its own row (whose logits are dropped) in a per-row precision."""
    def run(fill: float) -> list[np.ndarray]:
        e = Engine.load(tiny_mixed_artifact, provider="cpu", mixed_step=True)
        dec = e.decoder(3, 48, mixed=True)
        for x in dec.kv_arrays():
            x.fill(fill)
        dec.prefill(0, [[5, 6, 7]]), dec.prefill(2, [[8, 9]])
        tokens, live, out = np.array([11, 0, 12]), np.array([True, False, True]), []
        for k in range(3):
            step, last = dec.decode_with_chunk(tokens, live, 1, list(range(20 + 8 * k, 28 + 8 * k)), 8)
            out += [step[live].copy(), last.copy()]
            tokens = step.argmax(-1)
        return out

    for a, b in zip(run(0.0), run(1e4)):
        assert np.array_equal(a, b)
