"""Runtime behaviour beyond parity: sampling, streaming, chat, the tokenizer, no torch."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

from gpt2onnx.export import checkpoints
from gpt2onnx.runtime import Gpt2OnnxError
from gpt2onnx.runtime.request import TextStream
from gpt2onnx.runtime.sampling import GenerationConfig, Sampler


def test_synthetic_tokenizer_is_gpt2_shaped_and_deterministic():
    tok = checkpoints.synthetic_tokenizer()
    assert tok.get_vocab_size() == 50257
    assert tok.token_to_id("<|endoftext|>") == 50256
    assert checkpoints.synthetic_tokenizer().to_str() == tok.to_str()
    text = "Hello, café — naïve 🙂 1998"
    assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode(checkpoints.sample_text()).ids) >= 256  # enough text for accuracy figures


def test_sampling_reproducible_for_a_seed(engine):
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    a = engine.generate([[1, 2, 3], [4, 5]], **kw)
    assert a == engine.generate([[1, 2, 3], [4, 5]], **kw)
    assert a != engine.generate([[1, 2, 3], [4, 5]], **{**kw, "seed": 4321})


def test_a_negative_seed_is_a_seed_of_its_own(engine):
    """Seeds are signed 64-bit integers (OpenAI's and vLLM's APIs send -1 and negative hashes): a negative seed
    is reproducible and draws its own tokens, not those of its absolute value or of no seed."""
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.0, eos_token_id=-1)
    draw = lambda seed: engine.generate([[1, 2, 3]], seed=seed, **kw)[0]  # noqa: E731
    assert draw(-7) == draw(-7) and draw(-2**63) == draw(-2**63)
    assert len({tuple(draw(s)) for s in (-7, 7, -2**63, 2**63 - 1)}) == 4


def test_sampler_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    draws = lambda **kw: {Sampler(GenerationConfig(do_sample=True, seed=s, **kw))(logits) for s in range(200)}  # noqa: E731
    assert draws(top_k=2) == {0, 1}
    assert draws(top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
    assert draws(top_k=1) == {0}
    assert draws() == {0, 1, 2, 3}
    # repetition penalty: a seen positive logit is divided, so the top token can change
    seen = np.array([True, False, False, False])
    pen = Sampler(GenerationConfig(repetition_penalty=10.0))
    assert pen(np.array([2.0, 1.0, 0.0, -1.0], np.float32), seen) == 1


def test_repetition_penalty_changes_greedy_output(engine):
    plain = engine.generate([[1, 2, 3]], max_new_tokens=20)[0]
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself ...
    penalised = engine.generate([[1, 2, 3]], max_new_tokens=20, repetition_penalty=1e4)[0]
    assert len(set(penalised)) == len(penalised)  # ... unless repeats are penalised away


@pytest.mark.parametrize("huge, tiny_p", [(1e300, 1e-300), (3.5e38, 1e-45)])
def test_an_extreme_repetition_penalty_is_the_strongest_one_not_nan(engine, huge, tiny_p):
    # float32 logits times 1e300 were inf and NaN (overflow warnings, then argmax over NaN: garbage tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for p, bound in ((huge, 1e30), (tiny_p, 1e-30)):
            for kw in (dict(), dict(num_beams=2), dict(do_sample=True, seed=3)):
                got = engine.generate([[1, 2, 3]], max_new_tokens=12, repetition_penalty=p, **kw)[0]
                assert got == engine.generate([[1, 2, 3]], max_new_tokens=12, repetition_penalty=bound, **kw)[0]
                if p > 1 and not kw:  # the strongest penalty never repeats a token the row holds
                    assert len(set(got) | {1, 2, 3}) == len(got) + 3


def test_stream_joins_to_generate_text(engine):
    pieces = list(engine.stream("Hello there", max_new_tokens=20))
    assert "".join(pieces) == engine.generate_text("Hello there", max_new_tokens=20)
    assert len(pieces) > 1  # streamed piece by piece, not all at the end


def _byte_ids(text: str) -> list[int]:
    byte_ids = {b: i for i, b in enumerate(checkpoints._bytes_to_unicode())}
    return [byte_ids[b] for b in text.encode("utf-8")]


def test_stream_never_splits_a_character(engine):
    """Feed byte-level tokens one byte at a time: multi-byte characters arrive only when complete."""
    text = "naïve café — ünïcødé 🙂!"
    ids = _byte_ids(text)
    ts = TextStream(engine.decode)
    pieces = [ts.push(t) for t in ids] + [ts.finish()]
    pieces = [p for p in pieces if p]
    assert "".join(pieces) == text == ts.text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) < len(ids)  # some pieces waited for the rest of their character


@pytest.mark.parametrize("stop, expect", [(("ab",), "xx"), (("b c", "zz"), "xxa"), (("q",), "xxab cd"), (("d",), "xxab c")])
def test_stop_strings_cut_the_text_and_hold_back_a_possible_start(engine, stop, expect):
    ts = TextStream(engine.decode, stop)
    shown = ""
    for t in _byte_ids("xxab cd"):
        shown += ts.push(t)
        assert ts.text.startswith(shown)
        assert not any(s in shown for s in stop)  # never shown, not even in part at the end once known
        if ts.stopped:
            break
    shown += ts.finish()
    assert shown == ts.text == expect


def test_stream_and_generate_agree_with_stop_strings(engine):
    full = engine.generate_text("Hello there", max_new_tokens=12)
    stop = full[3:6]
    assert stop and stop in full
    cut = engine.generate_text("Hello there", max_new_tokens=12, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert "".join(engine.stream("Hello there", max_new_tokens=12, stop=[stop])) == cut


def test_generate_text_batch(engine):
    prompts = ["Hi", "How are you doing today?"]
    texts = engine.generate_text(prompts, max_new_tokens=5)
    assert texts == [engine.decode(r) for r in engine.generate([engine.encode(p) for p in prompts], max_new_tokens=5)]
    assert all(texts) and texts[0] != texts[1]


def test_chat_history_turns_and_reset(engine):
    chat = engine.chat(max_new_tokens=8)
    chat.send("Hello!")
    chat.send("What are you doing this weekend?")
    assert len(chat.turns) == 4 and all(t[-1] == engine.eos_token_id for t in chat.turns)
    # the reply of turn 2 is the continuation of the whole history joined by <|endoftext|>
    history = [t for turn in chat.turns[:3] for t in turn]
    expected = engine.generate([history], max_new_tokens=8)[0]
    assert chat.turns[3][: len(expected)] == expected
    # the second turn ran only its own tokens: the first turn's keys and values were kept
    chat.send("And after that?")
    assert engine.stats.cached_tokens == len(history) + len(expected) - 1  # all but the reply's last token
    chat.reset()
    assert chat.turns == []


def test_chat_empty_message_is_an_empty_turn_as_the_server_takes_it(engine):
    chat = engine.chat(max_new_tokens=6)
    chat.send("Hello!")
    chat.send("")
    eos = engine.eos_token_id
    assert chat.turns[2] == [eos]  # the user's empty turn: its EOS alone, as serve's encode_turns makes it
    history = [t for turn in chat.turns[:3] for t in turn]
    assert chat.turns[3][:6] == engine.generate([history], max_new_tokens=6)[0]
    with pytest.raises(Gpt2OnnxError, match="prompt must be text"):
        chat.send(None)


def test_chat_drops_oldest_turns_to_fit(engine):
    chat = engine.chat(max_new_tokens=20)  # tiny has 128 positions: 108 left for history
    for i in range(12):
        chat.send(f"This is message number {i}, with a few more words to fill the context.")
        assert sum(map(len, chat.turns)) <= engine.n_positions
    assert len(chat.turns) < 24  # old turns were dropped
    assert "number 11" in engine.decode(chat.turns[-2])


@pytest.mark.parametrize("kw, msg", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(nonsense=1), "unknown generation option"),
])
def test_bad_generation_options(engine, kw, msg):
    with pytest.raises(Gpt2OnnxError, match=msg):
        engine.generate([[1, 2]], **kw)


def test_truncate_keeps_newest_tokens(engine):
    long = list(range(1, 200))  # tiny: 128 positions
    with pytest.raises(Gpt2OnnxError, match="longer than the 128-position context"):
        engine.generate([long], max_new_tokens=4)
    out = engine.generate([long], max_new_tokens=4, truncate=True)
    assert out == engine.generate([long[-124:]], max_new_tokens=4) and len(out[0]) == 4


def test_runtime_and_server_import_no_torch(tiny_artifact):
    code = (
        "import sys\n"
        "from gpt2onnx.runtime import Engine\n"
        f"e = Engine.load({tiny_artifact!r}, provider='cpu')\n"
        "e.generate_text('hi', max_new_tokens=3); list(e.stream('hi', max_new_tokens=3)); e.chat().send('hi')\n"
        "from gpt2onnx.runtime import Scheduler\n"
        "with Scheduler(e) as s: s.submit('hi', max_new_tokens=3).result()\n"
        "from fastapi.testclient import TestClient\n"  # the server, through its routes
        "from gpt2onnx.serve.app import Model, build_app\n"
        "from gpt2onnx.serve.config import ServeConfig\n"
        "app = build_app([Model('m', e, Scheduler(e), 0)], ServeConfig())\n"
        "with TestClient(app) as c:\n"
        "    r = c.post('/v1/completions', json={'model': 'm', 'prompt': 'hi', 'max_tokens': 3})\n"
        "    assert r.status_code == 200, r.text\n"
        "bad = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_runtime_distribution_needs_no_torch():
    """`pip install .` (no extras) is the runtime: onnxruntime, numpy, tokenizers; torch only in extras."""
    from pathlib import Path

    import tomllib

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in meta["dependencies"]}
    assert names == {"onnxruntime", "numpy", "tokenizers"}
    assert any(d.startswith("torch") for d in meta["optional-dependencies"]["export"])


def _entry_points(engine):
    """Every way in: each takes token ids or text and generation options."""
    from gpt2onnx.runtime import Scheduler, SchedulerConfig

    sched = Scheduler(engine, SchedulerConfig(max_batch=1))
    return sched, {
        "generate": lambda p, **kw: engine.generate([p], **kw),
        "generate_text": lambda p, **kw: engine.generate_text(engine.decode(p), **kw),
        "stream": lambda p, **kw: list(engine.stream(p, **kw)),
        "scheduler": lambda p, **kw: sched.submit(p, **kw).result(timeout=30),
    }


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"), (dict(max_new_tokens="4"), "max_new_tokens must be an integer"),
    (dict(temperature=float("nan")), "temperature must be a finite number"), (dict(do_sample=True, temperature=0), "temperature must be > 0"),
    (dict(top_k=-1), "top_k must be >= 0"), (dict(top_p=1.5), r"top_p must be in \(0, 1\]"), (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(seed=2**63), "seed must be from -9223372036854775808 to 9223372036854775807"), (dict(eos_token_id=10**6), "outside the vocabulary"), (dict(stop="x"), "stop must be a list"),
    (dict(stop_token_ids=[-2]), "stop_token_ids entry must be >= 0"), (dict(logprobs=99), "logprobs must be from 0 to 20"),
    (dict(do_sample="yes"), "do_sample must be true or false"), (dict(beams=2), "unknown generation option"),
    (dict(max_new_tokens=200), "max_new_tokens=200 leaves no room for a prompt in 128 positions"),
])
def test_every_entry_point_validates_the_same_way(engine, kw, match):
    sched, points = _entry_points(engine)
    try:
        for call in points.values():
            with pytest.raises(Gpt2OnnxError, match=match):
                call([1, 2, 3], **kw)
        with pytest.raises(Gpt2OnnxError, match=match):
            engine.chat(**kw)
    finally:
        sched.close()


def test_too_long_prompt_is_one_message_everywhere(engine):
    """stream used to skip the checks and fail inside onnxruntime."""
    sched, points = _entry_points(engine)
    long = engine.encode(" hello world" * engine.n_positions)[: engine.n_positions + 5]
    assert len(engine.encode(engine.decode(long))) == len(long)  # the text entry point sees the same length
    try:
        messages = set()
        for call in points.values():
            with pytest.raises(Gpt2OnnxError, match="longer than the 128-position context") as e:
                call(long, max_new_tokens=4)
            messages.add(str(e.value))
        assert len(messages) == 1, messages
        assert "truncate=True" in messages.pop()  # what a Python caller passes (the CLI's --truncate)
        assert len(engine.generate([long], max_new_tokens=4, truncate=True)[0]) == 4  # what the message offers works
    finally:
        sched.close()


@pytest.mark.parametrize("prompt", [[15496.7, 11], ["15496", "11"], [True, 11], b"Hi", 7, None])
def test_token_ids_are_integers_not_coerced(engine, prompt):
    """A float, a numeric string, a bool or bytes is not a token id: refused, not truncated or parsed."""
    sched, points = _entry_points(engine)
    try:
        for name in ("generate", "stream", "scheduler"):  # generate_text takes text only (below)
            with pytest.raises(Gpt2OnnxError, match="must be text or a list of token ids|must hold integer token ids|input_ids must be"):
                points[name](prompt, max_new_tokens=2)
    finally:
        sched.close()


def test_batch_inputs_of_any_iterable_and_text_only_for_generate_text(engine):
    want = engine.generate([[15496, 11], [40, 1101]], max_new_tokens=3)
    assert engine.generate(np.array([[15496, 11], [40, 1101]]), max_new_tokens=3) == want
    assert engine.generate(iter([[15496, 11], [40, 1101]]), max_new_tokens=3) == want
    for bad in (5, None, b"hi", [1, 2]):
        with pytest.raises(Gpt2OnnxError, match="generate_text takes text or a list of texts"):
            engine.generate_text(bad, max_new_tokens=2)
    for bad in (5, None, b"hi", []):
        with pytest.raises(Gpt2OnnxError, match="input_ids must be a non-empty list of lists"):
            engine.generate(bad, max_new_tokens=2)


def test_chat_reply_is_cut_before_a_stop_string(engine):
    full = engine.chat(max_new_tokens=20, eos_token_id=-1).send("Hello")
    stop = next(c for c in full[3:] if c.isalnum() and c.isascii())
    chat = engine.chat(max_new_tokens=20, eos_token_id=-1, stop=[stop])
    cut = chat.send("Hello")
    assert cut == full[: full.index(stop)]
    # the history keeps the reply's tokens (the cache holds their keys): the next turn still reuses it
    chat.send("And then?")
    assert engine.stats.cached_tokens > 0


def test_default_threads_are_the_physical_cores_allowed(tmp_path, monkeypatch):
    """Hyperthread siblings count once and the affinity mask is respected (onnxruntime's own default,
    llama.cpp's advice); without the topology files, every CPU allowed."""
    import os

    from gpt2onnx.runtime.session import physical_cores

    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):  # 2 cores x 2 threads
        (tmp_path / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list").write_text(siblings + "\n")
    for allowed, want in (({0, 1, 2, 3}, 2), ({0, 2}, 1), ({0, 1}, 2)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, a=allowed: a)
        assert physical_cores(str(tmp_path)) == want
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3, 4})  # cpu4 has no topology file
    assert physical_cores(str(tmp_path)) == 5


@pytest.mark.parametrize("threads", [0, -1, 2.5, True, 10**6])
def test_threads_range_checked(tiny_artifact, threads):
    from gpt2onnx.runtime import Engine

    with pytest.raises(Gpt2OnnxError, match="threads must be an integer from 1"):
        Engine.load(tiny_artifact, provider="cpu", threads=threads)


def _anon_huge_kb(m) -> int:
    """AnonHugePages (kB) of the mapping of mmap `m`."""
    lo = np.frombuffer(m, np.uint8).ctypes.data
    cur = False
    for line in open("/proc/self/smaps"):
        f = line.split()
        if not f[0].endswith(":"):
            cur = int(f[0].split("-")[0], 16) == lo
        elif cur and f[0] == "AnonHugePages:":
            return int(f[1])
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_huge_pages_collapse_only_new_resident_memory():
    """What the session's build allocated moves to 2 MB pages; what existed before, or is not
    resident, is left alone (collapsing it would fault in memory nobody touched)."""
    import ctypes
    import mmap

    from gpt2onnx.runtime.session import _HUGE, _anon_regions, _huge_pages

    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def region(write: bool):  # a private anonymous mapping of its own: a read-only last page keeps it from merging
        m = mmap.mmap(-1, 16 * _HUGE + 4096, flags=mmap.MAP_PRIVATE)
        assert libc.mprotect(np.frombuffer(m, np.uint8).ctypes.data + 16 * _HUGE, 4096, mmap.PROT_READ) == 0
        a = np.frombuffer(m, np.uint8)[: 16 * _HUGE]
        if write:
            a[:] = 1
        else:
            a[::_HUGE] = 1  # one 4 KB page resident in each 2 MB
        return m

    old = region(True)  # resident before the snapshot: not ours to move
    before = _anon_regions()
    new = region(True)  # written after it: what a session's pre-packed weights look like
    untouched = region(False)  # mapped, mostly never written: mostly not resident
    if _huge_pages(before) == 0:
        pytest.skip("this kernel refuses MADV_COLLAPSE (Linux before 6.1, or THP set to never)")
    assert _anon_huge_kb(new) >= 15 * _HUGE // 1024  # all but a misaligned edge
    assert _anon_huge_kb(old) == 0 and _anon_huge_kb(untouched) == 0
    assert np.frombuffer(new, np.uint8)[: 16 * _HUGE].min() == 1  # the contents survive the copy


def test_huge_pages_option(tiny_artifact, monkeypatch):
    """Off: never attempted. Default (on, on Linux): attempted once, and the session config says
    whether anything moved; the kernel's answer is faked both ways so the check holds on any kernel."""
    from gpt2onnx.runtime import Engine
    from gpt2onnx.runtime import session as session_mod

    with pytest.raises(Gpt2OnnxError, match="huge_pages must be true, false or unset"):
        Engine.load(tiny_artifact, provider="cpu", huge_pages="yes")
    calls = []
    monkeypatch.setattr(session_mod, "_huge_pages", lambda before: calls.append(before) or collapsed)
    collapsed = 4 << 20
    off = Engine.load(tiny_artifact, provider="cpu", huge_pages=False)
    assert off.session_config.huge_pages is False and calls == []
    on = Engine.load(tiny_artifact, provider="cpu")
    linux = sys.platform.startswith("linux")
    assert on.session_config.huge_pages is linux and len(calls) == int(linux)
    collapsed = 0  # a kernel without MADV_COLLAPSE
    assert Engine.load(tiny_artifact, provider="cpu", huge_pages=True).session_config.huge_pages is False
    prompt = [[5, 6, 7, 8]]
    assert on.generate(prompt, max_new_tokens=8) == off.generate(prompt, max_new_tokens=8)


def test_cuda_sessions_take_flash_attention_only(tiny_artifact, monkeypatch):
    """Every CUDA session (captured, uncaptured, and the uncaptured retry after a refused capture) is
    made with sdpa_kernel=1: left to choose, onnxruntime 1.31 paid 45-85 ms per new prompt shape on an
    H200. onnxruntime's session constructor is stubbed: there is no CUDA here."""
    import onnxruntime as ort

    from gpt2onnx.runtime import session as session_mod
    from gpt2onnx.runtime.artifact import load_manifest

    made = []

    def fake(path, so, providers):
        made.append(providers)
        if len(made) == 3:  # the third: a capture onnxruntime refuses
            raise RuntimeError("This session cannot use the graph capture feature")
        return "session"

    monkeypatch.setattr(ort, "InferenceSession", fake)
    m, ep = load_manifest(tiny_artifact, verify="size"), session_mod.PROVIDERS["cuda"]
    m.raw["cuda_graph"] = {"capturable": True}  # as a CUDA export says (this CPU one would decline capture before trying)
    for graph in (True, False, True):
        sc = session_mod.SessionConfig(provider="cuda", cuda_graph=graph)
        with pytest.warns(UserWarning) if len(made) == 2 else contextlib.nullcontext():
            assert session_mod.build_session(m, ep, sc) == "session"
    assert [p[0][1] for p in made] == [{"sdpa_kernel": "1", "enable_cuda_graph": "1"}, {"sdpa_kernel": "1"},
                                       {"sdpa_kernel": "1", "enable_cuda_graph": "1"}, {"sdpa_kernel": "1"}]
    assert all(p[0][0] == ep for p in made) and sc.cuda_graph is False  # the refused capture is said
