"""The speed machinery, checked for behaviour (never for time): in-place cache, no per-token
allocation, finished rows dropped, prompt cache reuse, provider selection and fallback."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from gpt2onnx.runtime import Engine, Gpt2OnnxError, PromptCache
from gpt2onnx.runtime import session as session_mod
from gpt2onnx.runtime.decoder import Decoder

from .conftest import PROMPTS, captured, extended_vs_fresh, prefilled


def test_kv_cache_allocated_once_and_written_in_place(engine):
    dec, logits = prefilled(engine, PROMPTS, 10)
    buffers = [id(v) for v in dec._kv]
    before = dec.kv_arrays()[0].copy()
    for _ in range(5):
        logits = dec.decode(logits.argmax(-1))
    assert [id(v) for v in dec._kv] == buffers  # same buffers ...
    k0 = dec.kv_arrays()[0]
    assert k0.shape[2] == dec.capacity == max(map(len, PROMPTS)) + 10  # ... of the full capacity ...
    assert dec.held.tolist() == [len(p) + 5 for p in PROMPTS]  # ... holding every position fed so far:
    for r, p in enumerate(PROMPTS):  # each row's prompt kept in place, its 5 new tokens written right after it
        assert np.array_equal(k0[r, :, :len(p)], before[r, :, :len(p)])
        assert not np.isclose(k0[r, :, len(p): len(p) + 5], before[r, :, len(p): len(p) + 5]).all(axis=(0, 2)).any()


def test_no_allocation_on_the_per_token_path(engine):
    """Python/numpy allocations of a greedy decode step stay tiny: logits, ids, mask and cache are
    preallocated buffers (the logits alone would be batch x vocab x 4 = 600 kB a step)."""
    dec, logits = prefilled(engine, PROMPTS, 40)
    tokens = np.empty(len(PROMPTS), np.int64)
    for _ in range(3):  # settle any first-use caches
        np.argmax(logits, -1, out=tokens)
        logits = dec.decode(tokens)
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for _ in range(30):
        np.argmax(logits, -1, out=tokens)
        logits = dec.decode(tokens)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak - base < 16 * 1024, f"{peak - base} bytes allocated at peak over 30 steps"
    assert current - base < 8 * 1024, f"{current - base} bytes retained over 30 steps"


def test_finished_rows_stop_costing_work(engine, monkeypatch):
    """When half the rows hit EOS the live ones are packed into the first rows; the outputs do not change."""
    first = engine.generate([PROMPTS[0]], max_new_tokens=12)[0]
    eos = first[1]  # row 0 stops at its second token
    expected = [engine.generate([p], max_new_tokens=12, eos_token_id=eos)[0] for p in PROMPTS]
    assert len(expected[0]) == 2 and all(len(r) > 2 for r in expected[1:])
    packed, steps = [], []
    real_reorder, real_decode = Decoder.reorder, Decoder.decode
    monkeypatch.setattr(Decoder, "reorder", lambda self, parents: (packed.append(parents.tolist()), real_reorder(self, parents)))
    monkeypatch.setattr(Decoder, "decode", lambda self, tokens, live=None: (steps.append(len(tokens)), real_decode(self, tokens, live))[1])
    rows = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]]  # rows 0 and 2 finish together: half the batch
    out = engine.generate(rows, max_new_tokens=12, eos_token_id=eos)
    assert out == [expected[0], expected[1], expected[0], expected[2]]
    assert packed == [[1, 3]]  # the two live rows moved to the front, once
    assert steps[0] == 4 and steps[-1] == 2 and set(steps) == {4, 2}  # and the steps ran two rows from then on


def test_provider_selection_and_fallback(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert session_mod.select_provider("auto") == "CPUExecutionProvider"
    assert session_mod.select_provider("cpu") == "CPUExecutionProvider"
    with pytest.raises(Gpt2OnnxError, match="cuda is not available.*CPUExecutionProvider"):
        session_mod.select_provider("cuda")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session_mod.select_provider("auto") == "CUDAExecutionProvider"
    assert session_mod.select_provider("cuda") == "CUDAExecutionProvider"


def test_int8_refused_on_cuda_at_load():
    with pytest.raises(Gpt2OnnxError, match="int8 artifacts run on the cpu provider only"):
        session_mod.check_precision("int8", "CUDAExecutionProvider")


def test_threads_are_configurable(tiny_artifact):
    e = Engine.load(tiny_artifact, provider="cpu", threads=1)
    assert e.session_config.threads == 1
    assert e.generate([[1, 2, 3]], max_new_tokens=4) == Engine.load(tiny_artifact, provider="cpu").generate([[1, 2, 3]], max_new_tokens=4)


def test_graph_mode_decoders_reused_across_generations(tiny_artifact):
    """The CUDA-graph decode path (one Decoder per batch bucket at the full position table, reused by
    later generations, logits through a device-style buffer) exercised on CPU, where the run option
    that names the graph is ignored: its tokens must equal the ordinary path's."""
    plain = Engine.load(tiny_artifact, provider="cpu")
    graph = captured(tiny_artifact)
    for prompts in (PROMPTS, [p[::-1] for p in PROMPTS], PROMPTS[:1], PROMPTS[:2]):
        assert graph.generate(prompts, max_new_tokens=6) == plain.generate(prompts, max_new_tokens=6)
    assert sorted(graph._graph_decoders) == [1, 2, 4]  # one per bucket: 3 rows ran in the 4-row bucket, twice
    four = graph._graph_decoders[4]
    assert four.capacity == graph.n_positions and sorted(four._steps) == [(0, 0, 4, 1)]  # one step binding, never remade
    assert graph.generate(PROMPTS, max_new_tokens=6) == plain.generate(PROMPTS, max_new_tokens=6)
    assert graph._graph_decoders[4] is four


def test_graph_ids_on_a_capturing_session(tiny_artifact):
    """On a session created with enable_cuda_graph a run that names no graph is captured as graph 0, so
    every run a Decoder does not mean to capture says -1 (prompt passes, beam search), and the decode
    steps it does capture get ids unique across the session's Decoders (one per bucket)."""
    graph = captured(tiny_artifact)
    ids = lambda dec: sorted(int(ro.get_run_config_entry("gpu_graph_id")) for _, _, _, ro in dec._steps.values())  # noqa: E731
    graph.generate(PROMPTS, max_new_tokens=3)
    graph.generate(PROMPTS[:1], max_new_tokens=3)
    a, b = graph._graph_decoders[4], graph._graph_decoders[1]
    assert a._prompt_ro.get_run_config_entry("gpu_graph_id") == "-1"
    beams = graph.decoder(2, 16, captured=False)
    beams.prefill(0, PROMPTS[:2])
    beams.decode(np.array([5, 6], np.int64))
    assert ids(beams) == [-1] and beams._prompt_ro.get_run_config_entry("gpu_graph_id") == "-1"
    assert len(set(ids(a) + ids(b))) == 2 and min(ids(a) + ids(b)) >= 1
    plain = Engine.load(tiny_artifact, provider="cpu")  # an ordinary session names no graph at all
    dec = plain.decoder(1, 16)
    dec.prefill(0, PROMPTS[:1])
    dec.decode(np.array([5], np.int64))
    assert dec._prompt_ro is None and [ro for _, _, _, ro in dec._steps.values()] == [None]


def test_cuda_graph_only_requested_on_cuda(tiny_artifact):
    e = Engine.load(tiny_artifact, provider="cpu")
    assert e.session_config.cuda_graph is False and e.cuda_graph is False


def test_prompt_cache_extends_instead_of_rerunning(engine):
    e = engine
    assert extended_vs_fresh(e) <= 1e-4  # the fp32 parity tolerance
    cache, history = PromptCache(), list(PROMPTS[0])
    for turn in range(3):
        held = cache.tokens
        got = e.generate([history], cache=cache, max_new_tokens=6)
        assert e.stats.cached_tokens == held and e.stats.prompt_tokens == len(history)  # only the new tokens ran
        assert got == e.generate([history], max_new_tokens=6)  # the same reply as without the cache
        assert cache.tokens == len(history) + len(got[0]) - 1  # the last token is sampled, never fed
        history += got[0] + PROMPTS[turn % 3]
    assert held > 0
    e.generate([PROMPTS[2]], cache=cache, max_new_tokens=6)  # not a continuation: starts over
    assert e.stats.cached_tokens == 0 and cache.tokens == len(PROMPTS[2]) + 5
    with pytest.raises(Gpt2OnnxError, match="one prompt at a time"):
        e.generate(PROMPTS, cache=cache, max_new_tokens=2)


def test_prompt_cache_starts_over_when_it_cannot_extend(engine, tiny_artifact):
    cache = PromptCache()
    first = engine.generate([PROMPTS[0]], cache=cache, max_new_tokens=4)[0]
    longer = PROMPTS[0] + first + [7] * (engine.n_positions - len(PROMPTS[0]) - 4 - 8)
    engine.generate([longer], cache=cache, max_new_tokens=8)  # fits exactly: extends
    assert engine.stats.cached_tokens == len(PROMPTS[0]) + 3
    engine.generate([[PROMPTS[0][0] + 1] + PROMPTS[0][1:]], cache=cache, max_new_tokens=4)  # no shared prefix
    assert engine.stats.cached_tokens == 0
    other = Engine.load(tiny_artifact, provider="cpu")
    other.generate([cache.ids + [9]], cache=cache, max_new_tokens=4)  # another engine's cache is not read
    assert other.stats.cached_tokens == 0


def test_prompt_cache_keeps_the_longest_shared_prefix(engine):
    """A regenerated or edited last message reruns only what changed, as the Scheduler's slots do: the
    cache keeps the prefix the new prompt shares with what it holds, and the reply is the uncached one."""
    history, edited, shorter = PROMPTS[0] + PROMPTS[1], PROMPTS[0] + PROMPTS[2], PROMPTS[0][:3]
    want = {tuple(p): engine.generate([p], max_new_tokens=5) for p in (history, edited, shorter)}
    cache = PromptCache()
    for prompt, reused in [(history, 0),
                           (history, len(history) - 1),  # regenerate: the last token runs again for its logits
                           (edited, len(PROMPTS[0])),  # the last message replaced
                           (shorter, 2),  # a prefix of what the row holds: cut back, not rerun
                           (history, 3)]:
        assert engine.generate([prompt], cache=cache, max_new_tokens=5) == want[tuple(prompt)]
        assert (engine.stats.cached_tokens, engine.stats.prompt_tokens) == (reused, len(prompt))


def test_prompt_cache_in_graph_mode(tiny_artifact):
    """Captured graphs share one cache per batch size: another batch-1 generation in between takes
    it over, and the cached conversation then starts over instead of reading someone else's keys."""
    plain = Engine.load(tiny_artifact, provider="cpu")
    graph = captured(tiny_artifact)
    cache, history = PromptCache(), list(PROMPTS[0])
    first = graph.generate([history], cache=cache, max_new_tokens=5)
    history += first[0] + PROMPTS[1]
    assert graph.generate([history], cache=cache, max_new_tokens=5) == plain.generate([history], max_new_tokens=5)
    assert graph.stats.cached_tokens > 0
    graph.generate([PROMPTS[2]], max_new_tokens=5)  # no cache, batch 1: overwrites the shared buffers
    history += [3, 4]
    assert graph.generate([history], cache=cache, max_new_tokens=5) == plain.generate([history], max_new_tokens=5)
    assert graph.stats.cached_tokens == 0


def test_the_pick_graph_ships_and_would_run_on_cuda_without_copies(tiny_artifact):
    """Fused exports carry pick.onnx, listed and hashed like every file the runtime opens; onnxruntime's
    CUDA placement (as export/placement.py models it) keeps it on the device with no copy, so its run
    is captured beside the step's; the cpu provider leaves it off unless asked."""
    import onnx

    from gpt2onnx.export.placement import predict
    from gpt2onnx.runtime.artifact import load_manifest

    m = load_manifest(tiny_artifact)
    assert "pick.onnx" in m.raw["files"] and m.raw["io"]["pick"] == {"file": "pick.onnx", "input": "logits", "output": "next_token"}
    p = predict(onnx.load(m.file("pick.onnx")))
    assert p.capturable and not p.copies and not p.on_cpu
    assert Engine.load(tiny_artifact, provider="cpu").pick is None
    e = Engine.load(tiny_artifact, provider="cpu", device_pick=True)
    assert e.pick is not None and e.session_config.device_pick is True


@pytest.mark.parametrize("graph_mode", [False, True])
def test_device_pick_changes_no_token(tiny_artifact, graph_mode):
    """Greedy rows take the pick's ids instead of the logits from steps of 4 rows up (the CUDA path, run
    here on the CPU); every token equals numpy's argmax path; fewer rows, sampled rows and rows that
    ask for log-probabilities keep the logits."""
    from gpt2onnx.runtime.decoder import PICK_FROM

    plain = Engine.load(tiny_artifact, provider="cpu")
    e = captured(tiny_artifact, device_pick=True) if graph_mode else Engine.load(tiny_artifact, provider="cpu", device_pick=True)
    prompts = PROMPTS + [p[1:] for p in PROMPTS]  # 6 rows: the 8-row bucket in graph mode
    assert len(prompts) >= PICK_FROM
    assert e.generate(prompts, max_new_tokens=7, eos_token_id=-1) == plain.generate(prompts, max_new_tokens=7, eos_token_id=-1)
    ran = e.pick.runs
    assert ran == 6  # every step after the prompt pass's token
    assert e.generate(prompts[:2], max_new_tokens=5) == plain.generate(prompts[:2], max_new_tokens=5)
    sampled = dict(do_sample=True, top_k=5, seed=3, max_new_tokens=5)
    assert e.generate(prompts, **sampled) == plain.generate(prompts, **sampled)

    def with_logprobs(engine):  # generate returns no log-probabilities: Engine.run's Token events carry them
        reqs = [engine.request(p, engine.config(max_new_tokens=5, logprobs=2), index=i, stream=False) for i, p in enumerate(prompts)]
        return [(ev.id, ev.logprob) for events in engine.run(reqs) for ev in events]

    assert with_logprobs(e) == with_logprobs(plain)
    assert e.pick.runs == ran  # 2 rows, sampling, log-probabilities: the logits path


def test_decode_greedy_is_the_argmax_of_decode(tiny_artifact):
    """decode_greedy's ids are row for row the argmax of the logits the same step gives, on a decoder
    whose rows hold different lengths and one idle row."""
    e = Engine.load(tiny_artifact, provider="cpu", device_pick=True)
    rows = PROMPTS + [PROMPTS[1][::-1], [9]]
    a, b = e.decoder(len(rows), 40), e.decoder(len(rows), 40)
    a.prefill(0, rows[:1]), b.prefill(0, rows[:1])
    a.prefill(1, rows[1:]), b.prefill(1, rows[1:])
    tokens, live = np.arange(3, 3 + len(rows), dtype=np.int64), np.array([True, True, False, True, True])
    for _ in range(4):
        ids = a.decode_greedy(tokens, live).copy()
        want = b.decode(tokens, live).argmax(-1)
        assert np.array_equal(ids, want) and a.pick is not None
        tokens = want
    assert e.pick.runs == 4 and np.array_equal(a.held, b.held)


def test_an_artifact_without_a_pick_graph_still_runs(tiny_artifact, tmp_path):
    """Artifacts exported before pick.onnx existed load and pick on the host; asking for the device pick
    there is a one-line error that says to re-export."""
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_artifact, old)
    m = json.loads((old / "gpt2onnx.json").read_text())
    del m["files"]["pick.onnx"], m["io"]["pick"]
    (old / "gpt2onnx.json").write_text(json.dumps(m))
    (old / "pick.onnx").unlink()
    e = Engine.load(str(old), provider="cpu")
    assert e.pick is None and e.generate(PROMPTS, max_new_tokens=3) == Engine.load(tiny_artifact, provider="cpu").generate(PROMPTS, max_new_tokens=3)
    with pytest.raises(Gpt2OnnxError, match="has no pick graph .*re-export it"):
        Engine.load(str(old), provider="cpu", device_pick=True)


def test_a_failing_device_pick_falls_back_to_the_host(tiny_artifact, monkeypatch):
    """The pick is an optional speed-up: if onnxruntime refuses it (a capture some GPU cannot do), the
    step that ran still gives the right ids from its logits, one warning says so, and later steps pick
    on the host without trying again; the requests never see an error."""
    from gpt2onnx.runtime.decoder import Pick

    plain = Engine.load(tiny_artifact, provider="cpu")
    e = Engine.load(tiny_artifact, provider="cpu", device_pick=True)
    calls = []

    def refuse(self, binding):
        calls.append(1)
        raise RuntimeError("CUDA failure 901: operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(Pick, "run", refuse)
    prompts = PROMPTS + [p[1:] for p in PROMPTS]
    with pytest.warns(RuntimeWarning, match=r"device failed \(RuntimeError: CUDA failure 901: operation not permitted when stream is "
                                            r"capturing\); picking on the host from now on"):
        got = e.generate(prompts, max_new_tokens=6, eos_token_id=-1)
    assert got == plain.generate(prompts, max_new_tokens=6, eos_token_id=-1)
    assert len(calls) == 1 and e.pick.broken.startswith("RuntimeError")
    fresh = Engine.load(tiny_artifact, provider="cpu", device_pick=True)  # the failing step itself returns ids [n]
    a, b = fresh.decoder(len(prompts), 24), plain.decoder(len(prompts), 24)
    a.prefill(0, prompts), b.prefill(0, prompts)
    tokens = np.arange(5, 5 + len(prompts), dtype=np.int64)
    with pytest.warns(RuntimeWarning):
        ids = a.decode_greedy(tokens)
    assert ids.shape == (len(prompts),) and np.array_equal(ids, b.decode(tokens).argmax(-1)) and len(calls) == 2


class _DeviceLogits:
    """Stands in for a step's device logits buffer on the CPU: numpy() copies the rows the graph wrote,
    as onnxruntime's device-to-host copy of the OrtValue does."""

    def __init__(self, dec, first: int, b: int):
        self.dec, self.first, self.b = dec, first, b

    def numpy(self) -> np.ndarray:
        return self.dec.logits[self.first: self.first + self.b].copy()


def test_the_cuda_logits_path_on_the_cpu(tiny_artifact):
    """The CUDA branch of a fixed-shape pass (its logits come back from a device buffer, copied once into
    a new array, and the Decoder's own array is not written) run on the CPU with a stand-in buffer:
    decode steps and a prompt chunk give the plain path's logits, row for row."""
    plain, cuda = Engine.load(tiny_artifact, provider="cpu").decoder(3, 40), Engine.load(tiny_artifact, provider="cpu").decoder(3, 40)
    real = cuda._binding
    cuda._binding = lambda first, b, width: (lambda io, copies, _, ro: (io, copies, _DeviceLogits(cuda, first, b), ro))(
        *real(first, b, width))
    rows = PROMPTS
    want, got = plain.prefill(0, rows), cuda.prefill(0, rows)
    for _ in range(3):
        tokens = want.argmax(-1)
        want, got = plain.decode(tokens).copy(), cuda.decode(tokens)
        assert got.shape == (3, plain.spec.vocab_size) and np.array_equal(got, want)
        assert got.base is not cuda.logits  # a copy, not a view of the Decoder's array
    plain.truncate(1, 0), cuda.truncate(1, 0)
    assert np.array_equal(cuda.chunk(1, [5, 6, 7], 8), plain.chunk(1, [5, 6, 7], 8))


def test_int8_kv_prompts_run_in_capped_passes_with_the_same_logits(tmp_path_factory, engine, monkeypatch):
    """Over an int8 KV cache (int8 and int4 artifacts) a long prompt runs in passes of at most
    INT8_KV_PASS tokens (onnxruntime's attention costs more than linearly in a pass's length there):
    int4's logits and reply are bit-equal to one pass, the row holds the whole prompt, a float cache
    keeps one pass, and a prompt that does not fit is refused before any pass runs."""
    from gpt2onnx.export.convert import ExportOptions, export
    from gpt2onnx.runtime import decoder as decoder_mod

    from .conftest import QUIET

    int4 = Engine.load(export(ExportOptions("synthetic:tiny", str(tmp_path_factory.mktemp("kv") / "int4"), precision="int4"), log=QUIET))
    assert int4.spec.kv_dtype == np.int8
    row = np.random.default_rng(2).integers(0, 50000, 50).tolist()

    def run(e, cap: int):
        monkeypatch.setattr(decoder_mod, "INT8_KV_PASS", cap)
        passes = []
        dec = e.decoder(1, 64, captured=False)
        real = dec.session.run_with_iobinding
        monkeypatch.setattr(dec.session, "run_with_iobinding", lambda io, ro=None: (passes.append(1), real(io, ro))[1])
        logits = dec.prefill(0, [row]).copy()
        held = int(dec.held[0])
        monkeypatch.undo()
        return logits, len(passes), held

    whole, n1, held1 = run(int4, 10**6)
    pieces, n2, held2 = run(int4, 16)
    assert (n1, n2) == (1, 4) and held1 == held2 == 50  # 16 + 16 + 16 + 2
    assert np.array_equal(whole, pieces)
    replies = {}
    for cap in (10**6, 16):
        monkeypatch.setattr(decoder_mod, "INT8_KV_PASS", cap)
        replies[cap] = int4.generate([row], max_new_tokens=8, eos_token_id=-1)
    assert replies[16] == replies[10**6]
    _, n, _ = run(engine, 16)  # fp32 weights and cache: one pass
    assert n == 1
    monkeypatch.setattr(decoder_mod, "INT8_KV_PASS", 16)
    small = int4.decoder(1, 40, captured=False)
    with pytest.raises(Gpt2OnnxError, match="does not fit"):
        small.prefill(0, [row])
    assert int(small.held[0]) == 0  # nothing ran
