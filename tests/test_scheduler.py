"""The continuous-batching scheduler: every request gets what it gets alone, whatever shares its
batch; flow control (queue, cancellation, shutdown); conversation reuse; the async iterator."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from gpt2onnx.runtime import Engine, Gpt2OnnxError, QueueFull, Scheduler, SchedulerConfig

from .conftest import captured, prefilled


def workload(n: int, seed: int = 0, max_len: int = 40, max_new: int = 16) -> list[tuple[list[int], int]]:
    """Prompts of mixed lengths and reply lengths, deterministic."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 50000, size=int(rng.integers(1, max_len))).tolist(), int(rng.integers(1, max_new))) for _ in range(n)]


def alone(engine: Engine, prompt: list[int], **kw) -> list[int]:
    return engine.generate([prompt], **kw)[0]


@pytest.mark.parametrize("max_batch, chunk", [(1, 64), (4, 5), (8, 1)])
def test_greedy_equals_engine_generate_alone(engine, max_batch, chunk):
    """Mixed lengths, fewer slots than requests (slots reused), prompts run in chunks while others decode."""
    work = workload(20)
    expected = [alone(engine, p, max_new_tokens=n, eos_token_id=-1) for p, n in work]
    with Scheduler(engine, SchedulerConfig(max_batch=max_batch, max_queue=64, prefill_chunk=chunk)) as s:
        handles = [s.submit(p, max_new_tokens=n, eos_token_id=-1) for p, n in work]
        got = [h.result(timeout=120) for h in handles]
        m = s.metrics()
    assert [r.tokens for r in got] == expected
    assert [r.finish_reason for r in got] == ["length"] * len(work)
    assert m["generated_tokens"] == sum(n for _, n in work) and m["running"] == 0 and m["waiting"] == 0


def test_seeded_sampling_does_not_depend_on_batch_mates(engine):
    work = workload(12, seed=1)
    opts = [dict(do_sample=True, seed=i, top_k=[0, 40][i % 2], top_p=[1.0, 0.9][i % 3 == 0], temperature=0.7 + 0.1 * (i % 4),
                 repetition_penalty=[1.0, 1.3][i % 2]) for i in range(len(work))]
    expected = [alone(engine, p, max_new_tokens=n, **o) for (p, n), o in zip(work, opts)]
    for max_batch in (3, 12):
        with Scheduler(engine, SchedulerConfig(max_batch=max_batch, prefill_chunk=7)) as s:
            handles = [s.submit(p, max_new_tokens=n, **o) for (p, n), o in zip(work, opts)]
            assert [h.result(timeout=120).tokens for h in handles] == expected


@pytest.mark.parametrize("precision, method, invariant", [("int8", "nbits", True), ("int8", "dynamic", False), ("int4", "dynamic", None)])
def test_batch_invariance_is_measured_at_export(tmp_path_factory, engine, precision, method, invariant):
    """The export measures whether a row's logits depend on its batch-mates (rows prefilled and decoded
    together against each alone, through the decode core) and the manifest says so. MatMulNBits int8
    quantizes activations per row: exact, so a request's seeded samples do not move with its batch.
    DynamicQuantizeMatMul shares one scale per call: not. int4's one-row and many-row kernels may sum in
    other orders (~1e-6 on an AVX-512 VNNI CPU, amplified by the int8 KV cache): whatever is measured
    is what the manifest says. The fp32 engine's own artifact: exact."""
    from gpt2onnx.export.convert import ExportOptions, export
    from gpt2onnx.export.quantize import Int8Config

    from .conftest import QUIET

    fp32 = engine.manifest.raw["parity"]["batch_invariance"]
    assert fp32["invariant"] is True and fp32["max_abs_logit_diff"] == 0.0 and fp32["rows"] == 6  # 4, and a block tail beside a longer row
    out = str(tmp_path_factory.mktemp("art") / f"{precision}-{method}")
    path = export(ExportOptions("synthetic:tiny", out, precision=precision, int8=Int8Config(method=method)), log=QUIET)
    e = Engine.load(path, provider="cpu")
    measured = e.manifest.raw["parity"]["batch_invariance"]
    assert e.manifest.raw["quantization"]["batch_invariant"] is measured["invariant"]
    assert measured["invariant"] is (measured["max_abs_logit_diff"] == 0.0)
    if invariant is not None:
        assert measured["invariant"] is invariant
    if measured["invariant"]:
        work = workload(10, seed=2)
        opts = [dict(do_sample=True, seed=i, top_p=0.9) if i % 2 else dict(eos_token_id=-1) for i in range(len(work))]
        expected = [alone(e, p, max_new_tokens=n, **o) for (p, n), o in zip(work, opts)]
        with Scheduler(e, SchedulerConfig(max_batch=4, prefill_chunk=9)) as s:
            handles = [s.submit(p, max_new_tokens=n, **o) for (p, n), o in zip(work, opts)]  # all at once: batched
            assert [h.result(timeout=120).tokens for h in handles] == expected


def test_stop_conditions_and_logprobs_per_request(engine):
    prompt = [15496, 11, 703, 389]
    base = alone(engine, prompt, max_new_tokens=12, eos_token_id=-1)
    text = engine.decode(base)
    stop = text[4:7]
    with Scheduler(engine, SchedulerConfig(max_batch=4)) as s:
        by_id = s.submit(prompt, max_new_tokens=12, eos_token_id=-1, stop_token_ids=[base[5]])
        by_text = s.submit(prompt, max_new_tokens=12, eos_token_id=-1, stop=[stop])
        by_len = s.submit(prompt, max_new_tokens=3, eos_token_id=-1)
        lp = s.submit(prompt, max_new_tokens=6, eos_token_id=-1, logprobs=3)
        r_id, r_text, r_len, r_lp = (h.result(timeout=60) for h in (by_id, by_text, by_len, lp))
    assert r_id.tokens == base[: base.index(base[5]) + 1] and r_id.finish_reason == "stop"
    assert r_text.text == text[: text.index(stop)] and r_text.finish_reason == "stop" and stop not in r_text.text
    assert r_len.tokens == base[:3] and r_len.finish_reason == "length"
    assert r_lp.tokens == base[:6] and len(r_lp.logprobs) == 6
    for ev in r_lp.logprobs:
        assert len(ev.top_logprobs) == 3 and ev.top_logprobs[0][0] == ev.id  # greedy: the chosen token is the likeliest
        assert ev.logprob == pytest.approx(ev.top_logprobs[0][1]) and ev.logprob <= 0
        assert [p for _, p in ev.top_logprobs] == sorted((p for _, p in ev.top_logprobs), reverse=True)
        assert sum(np.exp(p) for _, p in ev.top_logprobs) <= 1 + 1e-6


def test_logprobs_match_the_model_distribution(engine):
    """The reported log-probability is log_softmax of the model's logits for the chosen token."""
    prompt = [40, 1101, 257]
    logits = prefilled(engine, [prompt], 1)[1][0].astype(np.float64)
    want = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    with Scheduler(engine) as s:
        ev = s.submit(prompt, max_new_tokens=1, logprobs=2).result(timeout=60).logprobs[0]
    assert ev.logprob == pytest.approx(want[ev.id], abs=1e-4)
    assert [t for t, _ in ev.top_logprobs] == list(np.argsort(-want)[:2])


def test_full_queue_refuses_at_once(engine):
    with Scheduler(engine, SchedulerConfig(max_batch=1, max_queue=1)) as s:
        long = [s.submit([1, 2, 3], max_new_tokens=100, eos_token_id=-1) for _ in range(2)]  # one runs, one waits
        # no time bound: a submit that waited for room would get it (the rows end) and raise nothing
        with pytest.raises(QueueFull, match="queue is full"):
            s.submit([1, 2], max_new_tokens=4)
        assert s.metrics()["refused"] == 1
        for h in long:
            h.cancel()


def test_cancel_frees_the_slot_within_a_step(engine):
    with Scheduler(engine, SchedulerConfig(max_batch=1, max_queue=4)) as s:
        first = s.submit([5, 6, 7], max_new_tokens=120, eos_token_id=-1)
        it = iter(first)
        next(it)  # it is running
        waiting = s.submit([8, 9], max_new_tokens=3, eos_token_id=-1)
        at_cancel = len(first.request.tokens)
        first.cancel()
        assert waiting.result(timeout=30).tokens == alone(engine, [8, 9], max_new_tokens=3, eos_token_id=-1)
        r = first.result(timeout=5)
        assert r.finish_reason == "cancelled" and len(r.tokens) < 120
        # the step in flight may finish (and one more may slip in between reading the count and cancelling)
        assert len(r.tokens) - at_cancel <= 2
        running = s.submit([5, 6], max_new_tokens=120, eos_token_id=-1)
        next(iter(running))
        queued = s.submit([8, 9], max_new_tokens=3)
        queued.cancel()  # leaves the queue before it ever ran: counted as a cancellation too
        running.cancel()
        assert queued.result(timeout=5).finish_reason == "cancelled" and running.result(timeout=5).finish_reason == "cancelled"
        assert s.metrics()["cancelled"] == 3


def test_consumer_going_away_cancels(engine):
    with Scheduler(engine, SchedulerConfig(max_batch=1)) as s:
        h = s.submit([5, 6, 7], max_new_tokens=120, eos_token_id=-1)
        for _ in h:
            break  # leaving the loop closes the iterator
        assert h.result(timeout=5).finish_reason == "cancelled"
        req = s.submit([1, 2], max_new_tokens=100, eos_token_id=-1).request  # the handle is dropped at once
        deadline = time.time() + 5
        while not req.done and time.time() < deadline:
            time.sleep(0.01)
        assert req.finish_reason == "cancelled"


def test_close_finishes_in_flight_then_refuses(engine):
    s = Scheduler(engine, SchedulerConfig(max_batch=2))
    handles = [s.submit(p, max_new_tokens=n, eos_token_id=-1) for p, n in workload(5, seed=3)]
    s.close()
    assert all(h.done and h.result().finish_reason == "length" for h in handles)
    assert not s.thread.is_alive()
    with pytest.raises(Gpt2OnnxError, match="shut down"):
        s.submit([1], max_new_tokens=2)
    s2 = Scheduler(engine, SchedulerConfig(max_batch=1))
    handles = [s2.submit([1, 2, 3], max_new_tokens=120, eos_token_id=-1) for _ in range(3)]
    s2.close(cancel=True)
    assert {h.result().finish_reason for h in handles} == {"cancelled"}
    assert s2.metrics()["cancelled"] == 3  # the running one and the two that waited


def test_async_iterator_and_wait(engine):
    prompt = [40, 1101, 257]
    expected = alone(engine, prompt, max_new_tokens=10, eos_token_id=-1)

    async def consume(s):
        h = s.submit(prompt, max_new_tokens=10, eos_token_id=-1)
        ids = [ev.id async for ev in h]
        whole = await s.submit(prompt, max_new_tokens=10, eos_token_id=-1).wait()
        return ids, whole.tokens

    with Scheduler(engine) as s:
        ids, whole = asyncio.run(consume(s))
    assert ids == whole == expected


def test_a_token_is_counted_before_it_is_published(engine):
    """/metrics and a client that has a request's last token agree: the scheduler counts each token before
    its consumers are woken (it counted after, so a snapshot taken at the end could miss the last one)."""
    with Scheduler(engine) as s:
        base = s.counters["generated_tokens"]
        h = s.submit([40, 1101, 257], max_new_tokens=16, eos_token_id=-1)
        seen = []  # (tokens the request has, tokens counted) at each wake-up, on the scheduler's thread
        h.request.wakers.append(lambda: seen.append((len(h.request.tokens), s.counters["generated_tokens"] - base)))
        assert len(h.result().tokens) == 16
    assert seen and seen[-1][0] == 16 and all(counted >= have for have, counted in seen), seen


def test_streamed_text_equals_the_result(engine):
    with Scheduler(engine) as s:
        h = s.submit("Hello, how are you?", max_new_tokens=20)
        pieces = "".join(ev.text for ev in h)
        assert pieces == h.result().text == engine.generate_text("Hello, how are you?", max_new_tokens=20)


def test_conversation_reuses_the_held_cache(engine):
    """A prompt extending the previous turn (prompt + reply) runs only the new tokens, and the reply
    equals a fresh run's; held prefixes never keep a fresh request waiting."""
    history = [15496, 11, 703, 389, 345, 30, 50256]
    held = 0
    with Scheduler(engine, SchedulerConfig(max_batch=2)) as s:
        for turn in range(3):
            r = s.submit(history, max_new_tokens=6).result(timeout=60)
            assert r.tokens == alone(engine, history, max_new_tokens=6)
            assert r.stats.cached_tokens == held
            held = len(history) + len(r.tokens) - 1  # the last token is sampled, never fed
            history = history + r.tokens + [50256, 40 + turn, 50256]
        assert s.metrics()["held_prefixes"] >= 1
        other = s.submit([9, 9, 9, 9], max_new_tokens=3).result(timeout=60)  # a fresh conversation
        another = s.submit([7, 7], max_new_tokens=3).result(timeout=60)  # evicts a held prefix, never waits for one
        assert other.stats.cached_tokens == another.stats.cached_tokens == 0
        assert another.tokens == alone(engine, [7, 7], max_new_tokens=3)


@pytest.mark.parametrize("score_chunk, prompt_width", [(128, 0), (7, 0), (7, 8)])
def test_prompt_logprobs_come_from_the_generation_s_own_pass(engine, monkeypatch, score_chunk, prompt_width):
    """submit(prompt_logprobs=k): the prompt's tokens scored in the pass that runs it for the generation
    (what echo with logprobs needs), equal to Engine.score's, while other rows decode (the pass cut to the
    step's budget, or SCORE_CHUNK tokens at most) and beside fixed-width chunks; the reply is the one the
    request gets without scores. A prompt a held slot already holds still runs in full, to be scored."""
    import gpt2onnx.runtime.scheduler as sched_mod

    monkeypatch.setattr(sched_mod, "SCORE_CHUNK", score_chunk)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 50000, n).tolist() for n in (100, 5, 60, 1)]
    cfg = SchedulerConfig(max_batch=3, prefill_chunk=16, prompt_width=prompt_width)
    with Scheduler(engine, cfg) as s:
        busy = [s.submit(rng.integers(0, 50000, 20).tolist(), max_new_tokens=40, eos_token_id=-1) for _ in range(2)]
        scored = [s.submit(p, prompt_logprobs=2, max_new_tokens=3, eos_token_id=-1) for p in prompts]
        plain = [s.submit(p, max_new_tokens=3, eos_token_id=-1) for p in prompts]
        got, want = [h.result(timeout=120) for h in scored], [h.result(timeout=120) for h in plain]
        again = s.submit(prompts[2], prompt_logprobs=0, max_new_tokens=1).result(timeout=60)  # a slot holds it
        assert all(h.result(timeout=60).finish_reason == "length" for h in busy)
    for p, r, q in zip(prompts, got, want):
        ref = engine.score(p, 2)
        assert r.tokens == q.tokens and q.prompt_logprobs is None
        assert [t.id for t in r.prompt_logprobs] == p and r.prompt_logprobs[0].logprob is None
        assert np.allclose([t.logprob for t in r.prompt_logprobs[1:]], [t.logprob for t in ref[1:]], atol=1e-6)
        assert [[i for i, _ in t.top_logprobs] for t in r.prompt_logprobs[1:]] == [[i for i, _ in t.top_logprobs] for t in ref[1:]]
        assert "".join(t.text for t in r.prompt_logprobs) == "".join(t.text for t in ref)
        assert r.stats.cached_tokens == 0
    assert again.stats.cached_tokens == 0 and len(again.prompt_logprobs) == 60
    assert np.allclose([t.logprob for t in again.prompt_logprobs[1:]], [t.logprob for t in engine.score(prompts[2])[1:]], atol=1e-6)


@pytest.mark.parametrize("k", [-1, 21, 1.5, "2"])
def test_prompt_logprobs_range_checked(engine, k):
    with Scheduler(engine, SchedulerConfig(max_batch=1)) as s, pytest.raises(Gpt2OnnxError, match="prompt_logprobs"):
        s.submit([1, 2, 3], prompt_logprobs=k)


def test_graph_mode_buckets_on_cpu(tiny_artifact):
    """The CUDA-graph path (batch padded to buckets 1, 2, 4, 8 ...; graph ids in run options, ignored
    on CPU) gives the same tokens."""
    e = captured(tiny_artifact)
    work = workload(9, seed=4)
    expected = [alone(e, p, max_new_tokens=n, eos_token_id=-1) for p, n in work]
    with Scheduler(e, SchedulerConfig(max_batch=6, prefill_chunk=8)) as s:
        assert [h.result(timeout=120).tokens for h in [s.submit(p, max_new_tokens=n, eos_token_id=-1) for p, n in work]] == expected
        used = {b for _, _, b, _ in s.kv._steps}
        assert 6 in used and used <= {1, 2, 4, 6}  # six fresh prompts decode first: the 6-row bucket (capped at the slots)
        assert s.kv is not e._graph_decoders.get(6)  # the scheduler's own buffers, own graph ids


def test_device_pick_in_the_scheduler(tiny_artifact):
    """Steps whose rows all pick greedily take the pick's ids (the CUDA path, on the CPU, graph mode);
    a step with a row that samples or wants log-probabilities takes the logits. Every request gets its
    tokens alone either way."""
    e = captured(tiny_artifact, device_pick=True)
    work = workload(10, seed=7)
    expected = [alone(e, p, max_new_tokens=n, eos_token_id=-1) for p, n in work]
    runs = e.pick.runs
    with Scheduler(e, SchedulerConfig(max_batch=8, prefill_chunk=16)) as s:
        assert [h.result(timeout=120).tokens for h in [s.submit(p, max_new_tokens=n, eos_token_id=-1) for p, n in work]] == expected
        assert e.pick.runs > runs
        runs = e.pick.runs
        mixed = [s.submit(p, max_new_tokens=6, eos_token_id=-1, **({"logprobs": 1} if i == 0 else {})) for i, (p, _) in enumerate(work[:5])]
        got = [h.result(timeout=120) for h in mixed]
    assert [r.tokens for r in got] == [alone(e, p, max_new_tokens=6, eos_token_id=-1) for p, _ in work[:5]]
    assert got[0].logprobs is not None


@pytest.mark.parametrize("max_batch, width, chunk", [(4, 1, 64), (6, 8, 8), (8, 48, 64)])
def test_fixed_width_prompt_chunks_change_no_token(engine, monkeypatch, max_batch, width, chunk):
    """prompt_width: while rows decode, prompts go in right-padded chunks of exactly `width` columns
    (Decoder.chunk); every request still gets exactly its tokens alone, and the chunks did run."""
    from gpt2onnx.runtime.decoder import Decoder

    widths = []
    real = Decoder.chunk
    monkeypatch.setattr(Decoder, "chunk", lambda self, r, toks, w: (widths.append((w, len(toks))), real(self, r, toks, w))[1])
    work = workload(20, seed=5)
    expected = [alone(engine, p, max_new_tokens=n, eos_token_id=-1) for p, n in work]
    with Scheduler(engine, SchedulerConfig(max_batch=max_batch, max_queue=64, prompt_width=width, prefill_chunk=chunk)) as s:
        got = [h.result(timeout=120) for h in [s.submit(p, max_new_tokens=n, eos_token_id=-1) for p, n in work]]
    assert [r.tokens for r in got] == expected
    assert widths and {w for w, _ in widths} == {width}
    assert width == 1 or any(c < width for _, c in widths)  # some chunks were padded


def test_prompt_chunks_captured_once_per_slot_and_width(tiny_artifact):
    """Under CUDA graphs (the code path, on the CPU) a chunk has fixed shapes: one binding and graph id
    per slot and width beside the decode steps' per bucket, made once, and the same tokens."""
    e = captured(tiny_artifact)
    work = workload(12, seed=6)
    expected = [alone(e, p, max_new_tokens=n, eos_token_id=-1) for p, n in work]
    with Scheduler(e, SchedulerConfig(max_batch=4, prompt_width=16, prefill_chunk=16)) as s:
        got = [h.result(timeout=120).tokens for h in [s.submit(p, max_new_tokens=n, eos_token_id=-1) for p, n in work]]
        keys = set(s.kv._steps)
        ids = [int(ro.get_run_config_entry("gpu_graph_id")) for _, _, _, ro in s.kv._steps.values()]
    assert got == expected
    chunks = {(first, b) for _, first, b, w in keys if w == 16}
    steps = {(first, b) for _, first, b, w in keys if w == 1}
    assert chunks and all(b == 1 for _, b in chunks) and {b for _, b in steps} <= {1, 2, 4} and all(f == 0 for f, _ in steps)
    assert len(set(ids)) == len(ids)  # a graph of its own per shape and row


def test_prompt_chunk_needs_room_and_takes_at_most_its_width(engine):
    """A chunk writes `width` columns after the row's tokens: a row without them refuses it (the
    scheduler then runs a pass of the prompt's own length), and a chunk holds 1 .. width tokens."""
    dec = engine.decoder(2, 24)
    dec.prefill(0, [list(range(1, 20))])
    assert dec.fits(0, 5) and not dec.fits(0, 6) and dec.fits(1, 24)
    with pytest.raises(Gpt2OnnxError, match="6-column chunk does not fit after the 19 tokens of a 24-position row"):
        dec.chunk(0, [5], 6)
    with pytest.raises(ValueError, match="a 2-column chunk takes 1 to 2 tokens, got 3"):
        dec.chunk(1, [1, 2, 3], 2)
    ref = engine.decoder(1, 24)
    want = ref.prefill(0, [[9, 8, 7]])[0].copy()
    assert np.array_equal(dec.chunk(1, [9, 8, 7], 8), want) and dec.held[1] == 3 and dec.mask[1].sum() == 3


def test_fresh_prompts_in_adjacent_slots_share_a_prompt_pass(engine, monkeypatch):
    """Requests admitted together into empty adjacent slots run in one left-padded prompt pass when
    padding wastes little; their tokens are still what each gets alone."""
    from gpt2onnx.runtime.decoder import Decoder

    passes = []
    real = Decoder.prefill
    monkeypatch.setattr(Decoder, "prefill", lambda self, first, rows: (passes.append((first, len(rows))), real(self, first, rows))[1])
    work = [(list(range(100, 110)), 6), (list(range(200, 209)), 5), (list(range(300, 310)), 7), ([5, 6], 4)]
    expected = [alone(engine, p, max_new_tokens=n, eos_token_id=-1) for p, n in work]
    passes.clear()
    s = Scheduler(engine, SchedulerConfig(max_batch=4))
    with s.cv:  # queue all four before the loop admits any
        handles = [s.submit(p, max_new_tokens=n, eos_token_id=-1) for p, n in work]
    assert [h.result(timeout=60).tokens for h in handles] == expected
    assert passes == [(0, 3), (3, 1)]  # 10, 9, 10 tokens share a pass; 2 tokens padded to 10 would waste too much
    s.close()
    assert s.kv._kv is None and not s.kv._steps  # closing releases the KV cache


@pytest.mark.parametrize("cfg, match", [(dict(max_batch=0), "max_batch"), (dict(max_queue=-1), "max_queue"),
                                        (dict(prefill_chunk=0), "prefill_chunk"), (dict(capacity=100000), "capacity"),
                                        (dict(prompt_width=-1), "prompt_width"), (dict(capacity=64, prompt_width=33), "prompt_width"),
                                        (dict(max_batch=1.5), "max_batch must be an integer")])
def test_scheduler_config_range_checked(engine, cfg, match):
    with pytest.raises(Gpt2OnnxError, match=match):
        Scheduler(engine, SchedulerConfig(**cfg))


def test_many_threads_get_what_they_get_alone(engine):
    """Engine.generate / stream / chat from 16 threads at once return what they return one at a time."""
    work = workload(16, seed=5)
    opts = [dict(max_new_tokens=n, **({"do_sample": True, "seed": i, "top_k": 20} if i % 3 == 0 else {})) for i, (_, n) in enumerate(work)]

    def call(i):
        p, o = work[i][0], opts[i]
        if i % 4 == 1:
            return "".join(engine.stream(p, **o))
        if i % 4 == 2:
            chat = engine.chat(**o)
            return [chat.send("Hi there"), chat.send("And then?")]
        return engine.generate([p, p[::-1]], **o)

    expected = [call(i) for i in range(len(work))]
    got = [None] * len(work)
    barrier = threading.Barrier(len(work))

    def worker(i):
        barrier.wait()
        got[i] = call(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected


def test_smaller_slot_capacity(engine):
    """Slots sized to a service's prompt + reply budget: requests that fit run as alone, the rest are refused."""
    with Scheduler(engine, SchedulerConfig(max_batch=2, capacity=24)) as s:
        assert s.kv.mask.shape == (2, 24) and s.kv.kv_arrays()[0].shape[:3] == (2, engine.spec.n_head, 24)
        assert s.submit([1, 2, 3], max_new_tokens=8, eos_token_id=-1).result(timeout=30).tokens == \
            alone(engine, [1, 2, 3], max_new_tokens=8, eos_token_id=-1)
        with pytest.raises(Gpt2OnnxError, match="runs past the 24-position context"):
            s.submit(list(range(20)), max_new_tokens=8)


def test_fp32_logits_do_not_depend_on_how_batch_mates_split_a_prompt(engine):
    """onnxruntime's CPU attention over a float cache computes a pass's rows in blocks of 2 x head_dim (32 on
    tiny), and a row alone in its block came out ~3e-6 apart: a 33-token prompt alone against beside a longer
    one, a one-token pass over a held prefix (the scheduler's reuse) against the fresh pass, a prompt chunked
    20 + 20 + 1 (the scheduler's chunks while another request decodes) against one pass. Such passes get one
    padding column (Decoder.lone_tail): bit-equal now."""
    rng = np.random.default_rng(0)
    p, q = rng.integers(0, 50000, 33).tolist(), rng.integers(0, 50000, 40).tolist()
    assert engine.spec.head_dim == 16  # the block these lengths straddle: 2 x 16
    alone = engine.decoder(1, 48).prefill(0, [p])[0].copy()
    assert np.array_equal(alone, engine.decoder(2, 48).prefill(0, [p, q])[0])
    dec = engine.decoder(1, 48)
    dec.prefill(0, [p[:32]])
    assert np.array_equal(alone, dec.prefill(0, [p[32:]])[0])  # a one-token pass over a held prefix
    dec = engine.decoder(1, 48)
    assert np.array_equal(dec.prefill(0, [p], every=True), engine.decoder(1, 48).prefill(0, [p + [7]], every=True)[:33])

    c = rng.integers(0, 50000, 41).tolist()  # a scheduler's chunks of 20 while another row decodes: 20, 20, 1
    dec = engine.decoder(1, 48)
    for a in (0, 20):
        dec.prefill(0, [c[a: a + 20]])
    assert np.array_equal(dec.prefill(0, [c[40:]])[0], engine.decoder(1, 48).prefill(0, [c])[0])

    kw = dict(max_new_tokens=4, do_sample=True, seed=5, logprobs=0)
    with Scheduler(engine, SchedulerConfig(max_batch=4)) as sched:
        first = sched.submit(p, **kw).result()
        again = sched.submit(p, **kw).result()  # its slot's 32-token prefix reused: a one-token pass
    assert again.stats.cached_tokens == 32
    lps = lambda r: [(t.id, t.logprob) for t in r.logprobs]  # noqa: E731
    assert lps(again) == lps(first)


def test_prompt_passes_while_idle_are_bounded_and_cancels_land_between_them(engine, monkeypatch):
    """Nothing decoding, every fresh prompt ran in one pass: 16 rows of 1,000 tokens were one 80-second pass
    on 2 cores that no cancel, timeout or arrival could interrupt. A pass is held to IDLE_PASS_TOKENS
    (rows x width) now, and a request cancelled meanwhile never runs its prompt."""
    from gpt2onnx.runtime import scheduler

    monkeypatch.setattr(scheduler, "IDLE_PASS_TOKENS", 256, raising=False)
    sched = Scheduler(engine, SchedulerConfig(max_batch=8))
    passes, handles = [], []
    prefill = sched.kv.prefill

    def counted(first, rows, *a, **kw):
        passes.append(len(rows) * max(len(r) for r in rows))
        if len(passes) == 1:  # a client leaves while the first pass runs
            for h in handles[4:]:
                h.cancel()
        return prefill(first, rows, *a, **kw)

    sched.kv.prefill = counted
    with sched.cv:  # all eight admitted together, as a burst finds an idle scheduler
        handles += [sched.submit([100 + i] * 100, max_new_tokens=2) for i in range(8)]
    results = [h.result(timeout=60) for h in handles]
    sched.close()
    assert passes and max(passes) <= 256, passes
    assert [r.finish_reason for r in results[4:]] == ["cancelled"] * 4 and all(not r.tokens for r in results[4:])
    assert all(len(r.tokens) == 2 for r in results[:4])
