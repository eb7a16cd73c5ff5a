"""The speed machinery, checked for behaviour (never for time): in-place cache, no per-token
allocation, finished rows dropped, prompt cache reuse, provider selection and fallback."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from gpt2onnx.runtime import Engine, Gpt2OnnxError, PromptCache
from gpt2onnx.runtime import session as session_mod
from gpt2onnx.runtime.state import DecodeState

from .conftest import PROMPTS


def test_kv_cache_allocated_once_and_written_in_place(engine):
    state = DecodeState(engine, PROMPTS, max_new_tokens=10)
    buffers = [id(v) for v in state.kv]
    before = state.kv[0].numpy().copy()
    logits = state.prefill()
    for _ in range(5):
        logits = state.step(logits.argmax(-1))
    assert [id(v) for v in state.kv] == buffers  # same buffers ...
    k0 = state.kv[0].numpy()
    assert k0.shape[2] == state.capacity  # ... of the full capacity ...
    written = state.T - 1  # ... holding every position fed so far (the last token's keys come with the next step)
    assert not np.array_equal(k0[:, :, :written], before[:, :, :written])


def test_no_allocation_on_the_per_token_path(engine):
    """Python/numpy allocations of a greedy decode step stay tiny: logits, ids, mask and cache are
    preallocated buffers (the logits alone would be batch x vocab x 4 = 600 kB a step)."""
    state = DecodeState(engine, PROMPTS, max_new_tokens=40)
    logits = state.prefill()
    tokens = np.empty(len(PROMPTS), np.int64)
    for _ in range(3):  # settle any first-use caches
        np.argmax(logits, -1, out=tokens)
        logits = state.step(tokens)
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for _ in range(30):
        np.argmax(logits, -1, out=tokens)
        logits = state.step(tokens)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak - base < 16 * 1024, f"{peak - base} bytes allocated at peak over 30 steps"
    assert current - base < 8 * 1024, f"{current - base} bytes retained over 30 steps"  # the step-time list only


def test_finished_rows_stop_costing_work(engine, monkeypatch):
    """When half the rows hit EOS the state drops them; the outputs do not change."""
    first = engine.generate([PROMPTS[0]], max_new_tokens=12)[0]
    eos = first[1]  # row 0 stops at its second token
    expected = [engine.generate([p], max_new_tokens=12, eos_token_id=eos)[0] for p in PROMPTS]
    assert len(expected[0]) == 2 and all(len(r) > 2 for r in expected[1:])
    sizes = []
    real = DecodeState.compact
    monkeypatch.setattr(DecodeState, "compact", lambda self, keep: (sizes.append(int(keep.sum())), real(self, keep)))
    rows = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2]]  # two rows finish together: half the batch
    out = engine.generate(rows, max_new_tokens=12, eos_token_id=eos)
    assert out == [expected[0], expected[0], expected[1], expected[2]]
    assert sizes == [2]


def test_plain_artifact_compacts_too(tiny_plain_artifact):
    e = Engine.load(tiny_plain_artifact, provider="cpu")
    first = e.generate([PROMPTS[0]], max_new_tokens=8)[0]
    rows = [PROMPTS[0], PROMPTS[1]]
    expected = [e.generate([r], max_new_tokens=8, eos_token_id=first[2])[0] for r in rows]
    assert e.generate(rows, max_new_tokens=8, eos_token_id=first[2]) == expected


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


def test_graph_mode_buffers_reused_across_generations(tiny_artifact):
    """The CUDA-graph decode path (fixed buffers per batch size at the full position table, reused by
    later generations, logits through a device buffer) exercised on CPU, where the run option that
    names the graph is ignored: its tokens must equal the ordinary path's."""
    plain = Engine.load(tiny_artifact, provider="cpu")
    graph = Engine.load(tiny_artifact, provider="cpu")
    graph.cuda_graph = True
    for prompts in (PROMPTS, [p[::-1] for p in PROMPTS], PROMPTS[:1]):
        assert graph.generate(prompts, max_new_tokens=6) == plain.generate(prompts, max_new_tokens=6)
    assert sorted(graph.graph_buffers.sets) == [1, 3]  # one buffer set per batch size, reused
    assert graph.graph_buffers.sets[3]["kv"][0].shape()[2] == graph.n_positions


def test_cuda_graph_only_requested_on_cuda(tiny_artifact):
    e = Engine.load(tiny_artifact, provider="cpu")
    assert e.session_config.cuda_graph is False and e.cuda_graph is False


def extended_vs_fresh(engine: Engine, steps: int = 3) -> float:
    """Max |logit difference| between a prompt pass that extends a cache (a prompt, 3 decode steps,
    then 4 more tokens) and a fresh prompt pass over the same tokens, and over `steps` decode steps
    after each."""
    state = DecodeState(engine, PROMPTS[:1], max_new_tokens=8, capacity=engine.n_positions)
    logits = state.prefill()
    for _ in range(3):
        logits = state.step(logits.argmax(-1))
    row = state.fed + [int(logits.argmax())] + PROMPTS[1][:3]
    assert state.can_extend(row, 8)
    fresh = DecodeState(engine, [row], max_new_tokens=8)
    a, b = state.extend(row), fresh.prefill()
    assert state.stats.cached_tokens == len(PROMPTS[0]) + 3 and state.T == fresh.T == len(row)
    diff = float(np.abs(a - b).max())
    for _ in range(steps):
        t = b.argmax(-1)
        a, b = state.step(t), fresh.step(t)
        diff = max(diff, float(np.abs(a - b).max()))
    return diff


@pytest.mark.parametrize("fuse", [True, False])
def test_prompt_cache_extends_instead_of_rerunning(fuse, tiny_artifact, tiny_plain_artifact):
    e = Engine.load(tiny_artifact if fuse else tiny_plain_artifact, provider="cpu")
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
    engine.generate([PROMPTS[0]], cache=cache, max_new_tokens=4)  # a prefix of the cache, not an extension
    assert engine.stats.cached_tokens == 0
    other = Engine.load(tiny_artifact, provider="cpu")
    other.generate([cache.state.fed + [9]], cache=cache, max_new_tokens=4)  # another engine's cache is not read
    assert other.stats.cached_tokens == 0


def test_prompt_cache_in_graph_mode(tiny_artifact):
    """Captured graphs share one cache per batch size: another batch-1 generation in between takes
    it over, and the cached conversation then starts over instead of reading someone else's keys."""
    plain = Engine.load(tiny_artifact, provider="cpu")
    graph = Engine.load(tiny_artifact, provider="cpu")
    graph.cuda_graph = True
    cache, history = PromptCache(), list(PROMPTS[0])
    first = graph.generate([history], cache=cache, max_new_tokens=5)
    history += first[0] + PROMPTS[1]
    assert graph.generate([history], cache=cache, max_new_tokens=5) == plain.generate([history], max_new_tokens=5)
    assert graph.stats.cached_tokens > 0
    graph.generate([PROMPTS[2]], max_new_tokens=5)  # no cache, batch 1: overwrites the shared buffers
    history += [3, 4]
    assert graph.generate([history], cache=cache, max_new_tokens=5) == plain.generate([history], max_new_tokens=5)
    assert graph.stats.cached_tokens == 0
