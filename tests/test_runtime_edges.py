"""Edges of the runtime a user reaches: a generation started inside its own open stream under CUDA
graphs, a decoder sized past the model or a row past its capacity, temperatures near zero, absurd
logit_bias ids, and which prompt of several an error names."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from gpt2onnx.runtime import Gpt2OnnxError, PromptCache
from gpt2onnx.runtime.sampling import GenerationConfig, Sampler

from .conftest import captured


def _in_thread(fn, timeout: float = 30.0):
    """fn() on a daemon thread; its result, or a failure when it does not return within `timeout` (a hang)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"did not return within {timeout} s (a deadlock)"
    return out[0]


def test_graph_mode_generation_inside_an_open_stream_does_not_deadlock(tiny_artifact, engine):
    """Under CUDA graphs (the default on CUDA) a generation holds the engine's captured decoders until it
    ends; a second generation started on the same thread while a stream is still open waited for itself
    forever (two streams zipped, chat.send or generate inside a stream loop). It now runs uncaptured, as
    on the CPU, and both get what they get alone."""
    g = captured(tiny_artifact)
    kw = dict(max_new_tokens=6, eos_token_id=-1)
    want_a, want_b = engine.generate([[15496, 11]], **kw)[0], engine.generate([[40, 1101, 257]], **kw)[0]
    text_a, text_b = "".join(engine.stream([15496, 11], **kw)), "".join(engine.stream([40, 1101, 257], **kw))

    def zipped():
        a, b = g.stream([15496, 11], **kw), g.stream([40, 1101, 257], **kw)
        pairs = list(itertools.zip_longest(a, b, fillvalue=""))  # advanced in turn, both open until the shorter ends
        return "".join(x for x, _ in pairs), "".join(y for _, y in pairs)

    assert _in_thread(zipped) == (text_a, text_b)

    def nested():
        it = g.stream([15496, 11], **kw)
        first = next(it)
        inner = g.generate([[40, 1101, 257]], **kw)[0]
        inner_cached = g.generate([[40, 1101, 257]], cache=PromptCache(), **kw)[0]
        outer = first + "".join(it)
        return inner, inner_cached, outer, g.generate([[15496, 11]], **kw)[0]  # the captured path again afterwards

    inner, inner_cached, outer, after = _in_thread(nested)
    assert inner == inner_cached == want_b and after == want_a and outer == text_a


def test_decoder_capacity_is_checked_against_the_model(engine):
    """engine.decoder() (the README's own-loop API) took a capacity past the model's positions and failed
    later inside onnxruntime's position lookup (CPU), with no message saying why."""
    with pytest.raises(Gpt2OnnxError, match="capacity must be from 1 to 128"):
        engine.decoder(1, engine.n_positions + 1)
    with pytest.raises(Gpt2OnnxError, match="slots must be >= 1"):
        engine.decoder(0, 16)
    assert engine.decoder(1, engine.n_positions).capacity == engine.n_positions


@pytest.mark.parametrize("temperature", [1e-300, 1e-310, 5e-324])
def test_tiny_temperature_samples_the_likeliest_token(temperature):
    """A positive temperature passes validation; one under ~1e-308 overflowed logits / temperature to
    +-inf, the softmax became NaN and every draw returned token 0 instead of the argmax."""
    logits = np.array([0.5, 3.0, -2.0, 1.0, 2.9], np.float32)
    s = Sampler(GenerationConfig(do_sample=True, temperature=temperature, seed=0))
    assert {s(logits) for _ in range(20)} == {1}


def test_a_full_row_is_a_one_line_error(engine):
    """A decoder's row that holds its whole capacity cannot take another token: a Gpt2OnnxError naming
    the row, not numpy's IndexError from the mask."""
    dec = engine.decoder(2, 8)
    dec.prefill(0, [[1, 2, 3, 4, 5]])
    for _ in range(3):
        dec.decode(np.array([1, 1]))
    with pytest.raises(Gpt2OnnxError, match="row 0 holds 8 tokens, its whole capacity"):
        dec.decode(np.array([1, 1]))


@pytest.mark.parametrize("call, needle", [
    (lambda d: d.prefill(0, [[15496, 11], [40, 1101, 257], [5]]), r"3 prompt rows from row 0 do not fit this decoder's 2 slots"),
    (lambda d: d.prefill(1, [[1], [2]]), r"2 prompt rows from row 1 do not fit"),
    (lambda d: d.prefill(-1, [[1]]), r"1 prompt row from row -1 do not fit"),
    (lambda d: d.prefill(0, []), r"0 prompt rows"),
    (lambda d: d.prefill(0, [[1], []]), r"prompt row 1 is empty"),
    (lambda d: d.prefill(0, [[1, 60000]]), r"prompt row 0 holds an id outside the vocabulary \[0, 50257\)"),
    (lambda d: d.prefill(0, [[-1]]), r"outside the vocabulary"),
    (lambda d: d.decode(np.array([1, 2, 3])), r"a step takes 1 to 2 tokens \(one per row\), got 3"),
    (lambda d: d.chunk(-1, [1, 2], 4), r"row -1 is outside this decoder's 2 slots"),
    (lambda d: d.chunk(2, [1, 2], 4), r"row 2 is outside"),
    (lambda d: d.truncate(0, 5), r"row 0 holds 0 tokens; it can keep 0 to 0, not 5"),
])
def test_the_decoder_refuses_rows_and_ids_it_does_not_have(engine, call, needle):
    """engine.decoder() (the README's own-loop API) binds its cache rows and logits by address: rows past
    its slots (or before row 0) made onnxruntime write outside them (an abort or heap corruption), ids
    outside the vocabulary were onnxruntime's Gather error or (-1) silently the last token."""
    dec = engine.decoder(2, 16)
    with pytest.raises(Gpt2OnnxError, match=needle):
        call(dec)
    assert dec.prefill(0, [[1, 2], [3]]).shape == (2, engine.spec.vocab_size)  # the decoder still works


def test_a_closed_decoder_says_so(engine):
    dec = engine.decoder(1, 16)
    dec.prefill(0, [[1, 2]])
    dec.close()
    for call in (lambda: dec.prefill(0, [[1]]), lambda: dec.decode(np.array([1])), lambda: dec.chunk(0, [1], 4)):
        with pytest.raises(Gpt2OnnxError, match="this decoder is closed"):
            call()


def test_a_huge_logit_bias_id_is_refused_as_outside_the_vocabulary(engine):
    """Checked against the vocabulary before the sampler builds its bias arrays (an id past int64 was
    numpy's OverflowError there)."""
    with pytest.raises(Gpt2OnnxError, match="logit_bias token id 99999999999999999999999 is outside the vocabulary"):
        engine.generate([[1, 2]], max_new_tokens=2, logit_bias={10**23 - 1: 1.0})


@pytest.mark.parametrize("penalty", [1000.0, -1000.0, 1e308, 10.5])
def test_a_length_penalty_beam_search_cannot_score_is_refused(engine, penalty):
    """new_tokens ** length_penalty overflowed float32 (numpy's overflow warnings) and then Python's float
    (OverflowError out of generate, 'internal error' in the CLI) for penalties far past the usual 0.6-2."""
    with pytest.raises(Gpt2OnnxError, match=r"length_penalty must be from -10 to 10 \(usually 0.6-2\)"):
        engine.generate([[1, 2]], max_new_tokens=5, num_beams=2, length_penalty=penalty)
    assert engine.generate([[1, 2]], max_new_tokens=5, num_beams=2, length_penalty=-10.0, eos_token_id=-1)


def test_entry_points_that_return_no_logprobs_refuse_them(engine):
    """generate, generate_text, stream and chat return tokens or text: a logprobs option was computed
    every step and dropped. It is refused, pointing at what returns them."""
    for name, call in {"generate": lambda: engine.generate([[1, 2]], logprobs=2),
                       "generate_text": lambda: engine.generate_text("hi", logprobs=0),
                       "stream": lambda: engine.stream("hi", logprobs=1),
                       "chat": lambda: engine.chat(logprobs=1)}.items():
        with pytest.raises(Gpt2OnnxError, match=f"^{name} returns no log-probabilities; drop logprobs, or submit") as e:
            call()
        assert e.value.param == "logprobs"


def test_scheduler_errors_name_the_callers_prompt(engine):
    from gpt2onnx.runtime import Scheduler, SchedulerConfig

    sched = Scheduler(engine, SchedulerConfig(max_batch=2))
    try:
        with pytest.raises(Gpt2OnnxError, match="prompt 3 is empty"):
            sched.submit([], index=3)
        with pytest.raises(Gpt2OnnxError, match="token id 99999 in prompt 1 "):
            sched.submit([1, 99999], index=1, max_new_tokens=2)
    finally:
        sched.close()


def test_a_text_too_long_to_fit_is_refused_before_it_is_tokenized(engine, monkeypatch):
    """The tokenizer holds the GIL ~1.4 s a megabyte (the server's event loop waited that long for a text it
    then refused): a text whose bytes over the vocabulary's longest piece already exceed the context is
    refused unencoded. Shorter texts, and truncate=True (which keeps the newest tokens), are tokenized."""
    calls = []
    real = engine.encode
    monkeypatch.setattr(engine, "encode", lambda text, index=None: calls.append(len(text)) or real(text, index))
    with pytest.raises(Gpt2OnnxError, match=r"prompt 2 has at least \d+ tokens, longer than the 128-position context"):
        engine.request("漢字" * 200_000, GenerationConfig(max_new_tokens=4), index=2)
    assert calls == []
    with pytest.raises(Gpt2OnnxError, match=r"prompt 0 has \d+ tokens"):  # too long, but not provably so unencoded
        engine.request("hello " * 200, GenerationConfig(max_new_tokens=4))
    assert len(engine.request("漢字" * 20_000, GenerationConfig(max_new_tokens=4, truncate=True)).ids) == 124
    assert calls == [1200, 40_000]


@pytest.mark.parametrize("kw, param", [
    (dict(top_p=2.0), "top_p"), (dict(top_k=-1), "top_k"), (dict(stop_token_ids=[-3]), "stop_token_ids"),
    (dict(logit_bias={5: 1e9}), "logit_bias"), (dict(logit_bias={"a": 1}), "logit_bias"),
    (dict(num_beams=2, do_sample=True, temperature=1.0), "num_beams"), (dict(presence_penalty=9.0), "presence_penalty"),
])
def test_config_errors_name_their_option(kw, param):
    """Each refusal carries the option at fault (the server's OpenAI `param`), not only words."""
    with pytest.raises(Gpt2OnnxError) as e:
        GenerationConfig(**kw).validate()
    assert e.value.param == param, str(e.value)


def test_prompt_errors_name_the_prompt(engine):
    for prompt in ([], [10**9], "", [1.5]):
        with pytest.raises(Gpt2OnnxError) as e:
            engine.request(prompt, GenerationConfig(max_new_tokens=2))
        assert e.value.param == "prompt", str(e.value)
    with pytest.raises(Gpt2OnnxError, match="^prompt 1 is empty; pass some text$"):  # which of several
        engine.generate_text(["hi", ""])


def test_errors_survive_pickling_as_a_process_pool_sends_them():
    import pickle

    from gpt2onnx.runtime.errors import ContextOverflow

    e = pickle.loads(pickle.dumps(ContextOverflow(2, 3000, 16, 1024, at_least=True)))
    assert (e.index, e.prompt_len, e.max_new, e.limit, e.at_least, e.param) == (2, 3000, 16, 1024, True, "prompt")
    assert str(e).startswith("prompt 2 has at least 3000 tokens")
    e = pickle.loads(pickle.dumps(Gpt2OnnxError("top_p must be in (0, 1], got 2", param="top_p")))
    assert (str(e), e.param) == ("top_p must be in (0, 1], got 2", "top_p")


@pytest.mark.parametrize("prompt, kw, needle, param", [
    ([], {}, "prompt 0 is empty", "prompt"),
    ([5, 99999999], {}, "outside the vocabulary", "prompt"),
    ("", {}, "prompt 0 is empty", "prompt"),
    ([5] * 2000, {}, "longer than the", "prompt"),
    ([5, 6], {"top_logprobs": 21}, "top_logprobs", "top_logprobs"),
])
def test_score_refuses_bad_input_in_one_line(engine, prompt, kw, needle, param):
    with pytest.raises(Gpt2OnnxError) as e:
        engine.score(prompt, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value) and e.value.param == param, (str(e.value), e.value.param)
    assert "truncate" not in str(e.value)  # scoring keeps every token: no truncate to offer


@pytest.mark.parametrize("module,old", [("onnxruntime", "1.27.0"), ("tokenizers", "0.19.1")])
def test_a_library_older_than_the_floor_is_refused_naming_the_upgrade(tiny_artifact, monkeypatch, module, old):
    """Below the floors an int8 artifact ran wrong rows (onnxruntime 1.27), failed its first pass with an
    internal error (1.25-1.26), or was refused with "re-export it", which cannot help (1.22-1.24, tokenizers
    0.19): pip keeps the floors, a --no-deps install or a system package does not."""
    import importlib

    from gpt2onnx.runtime import Engine

    monkeypatch.setattr(importlib.import_module(module), "__version__", old)
    with pytest.raises(Gpt2OnnxError) as e:
        Engine.load(tiny_artifact, provider="cpu")
    assert str(e.value).startswith(f"{module} {old} is older than ") and f"pip install -U '{module}>=" in str(e.value)


def test_an_export_below_the_floor_is_refused_before_it_writes(tmp_path, monkeypatch):
    """onnxruntime 1.22-1.23's int4 quantizer raised a TypeError from inside the export; 1.27 exported
    and failed its parity check by 10.4 after minutes of work."""
    import onnxruntime

    from gpt2onnx.export.convert import ExportOptions, export

    monkeypatch.setattr(onnxruntime, "__version__", "1.23.2")
    with pytest.raises(Gpt2OnnxError, match=r"^onnxruntime 1\.23\.2 is older than "):
        export(ExportOptions(model="synthetic:tiny", output=str(tmp_path / "art"), precision="int4"), log=lambda _: None)
    assert not any(tmp_path.iterdir())


def test_the_runtime_floors_are_the_packages_floors():
    """MIN_VERSIONS and pyproject's dependencies say the same (one found by running old releases, one pip keeps)."""
    import re
    from pathlib import Path

    from gpt2onnx.runtime.session import MIN_VERSIONS

    deps = Path(__file__).resolve().parent.parent.joinpath("pyproject.toml").read_text().split("dependencies = [", 1)[1]
    deps = deps.split("]", 1)[0]
    for name, floor in MIN_VERSIONS.items():
        found = re.search(rf'"{name}>=([\d.]+)"', deps)
        assert found, f"pyproject's runtime dependencies have no {name}>= floor"
        assert tuple(int(x) for x in found.group(1).split(".")[:2]) == floor, (name, found.group(1), floor)


def test_make_floors_installs_pyprojects_floors():
    """requirements-floors.txt pins each package at the floor pyproject gives it (`make floors` runs what pip
    admits, not a newer release), but where it says why not: torch (only 2.13.0 is installable here) and
    tokenizers (transformers' own floor is newer; the runtime's runs alone, from pyproject)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    floors = dict(re.findall(r'"([a-z-]+)(?:\[[a-z]+\])?>=([\d.]+)', root.joinpath("pyproject.toml").read_text()))
    pins = dict(re.findall(r"^([a-z-]+)==([\d.]+)", root.joinpath("requirements-floors.txt").read_text(), re.M))
    assert len(pins) >= 15 and "onnxruntime" in pins, pins
    for name, pin in pins.items():
        if name in ("torch", "tokenizers"):
            continue
        assert name in floors, f"requirements-floors.txt pins {name}, which pyproject does not name"
        norm = lambda v: tuple(int(x) for x in v.split(".")) + (0,) * (3 - len(v.split(".")))  # noqa: E731
        assert norm(pin) == norm(floors[name]), (name, pin, floors[name])
