"""Beam search, no_repeat_ngram_size and min_new_tokens against Hugging Face transformers' `generate`,
token for token in fp32 on synthetic:tiny; their validation; the beams' KV reorder allocates nothing."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import torch

from gpt2onnx.export.parity import left_pad
from gpt2onnx.runtime import Gpt2OnnxError, PromptCache, Scheduler

from .conftest import prefilled, run_cli

# three prompts of different lengths: the batch is left-padded
PROMPTS = [[464, 2068, 7586, 21831, 18045, 625, 262], [15496, 11, 703], [40, 1101, 257, 3303, 13, 314, 588, 340, 13, 2]]
NEW = 16


def hf_generate(model, rows: list[list[int]], eos: int | list[int], pad: int, **kw) -> list[list[int]]:
    """transformers generate on a left-padded batch; each row's new tokens up to its first stop token (included)."""
    ids, mask, _ = left_pad(rows, pad)
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), pad_token_id=pad,
                             eos_token_id=eos, **kw)
    stops = set(eos) if isinstance(eos, list) else {eos}
    cut = lambda row: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))  # noqa: E731
    return [row[: cut(row)] for row in out[:, ids.shape[1]:].tolist()]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """transformers' beam search on the tiny model is per-step overhead; on a busy 2-core machine
    PyTorch's spinning worker threads made it ten times slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stops(engine):
    """Stop tokens the beams meet early: tokens of the beams' own unstopped replies, so hypotheses end
    at different steps (the synthetic model's own EOS is rarely likely)."""
    base = engine.generate(PROMPTS, max_new_tokens=NEW, num_beams=4, eos_token_id=-1)
    greedy = engine.generate(PROMPTS, max_new_tokens=NEW, eos_token_id=-1)
    return {"A": base[0][3], "B": base[1][5], "G": greedy[0][2]}


CASES = [  # (num_beams, options, stop token: the model's EOS or one of `stops`)
    (2, {}, None),
    (4, {}, None),
    (4, dict(length_penalty=0.5, early_stopping=True), None),
    (4, dict(length_penalty=2.0), "A"),
    (3, dict(length_penalty=-0.5, early_stopping="never"), "A"),
    (4, dict(early_stopping=True), "B"),
    (2, dict(length_penalty=0.0, early_stopping="never"), "B"),
    (4, dict(no_repeat_ngram_size=2, min_new_tokens=6), "A"),
    (3, dict(no_repeat_ngram_size=3, min_new_tokens=4, length_penalty=1.5), "B"),
    (4, dict(no_repeat_ngram_size=1), None),
]


@pytest.mark.parametrize("beams, opts, stop", CASES)
def test_beam_search_equals_transformers(engine, tiny, stops, beams, opts, stop):
    eos = engine.eos_token_id if stop is None else stops[stop]
    ours = engine.generate(PROMPTS, max_new_tokens=NEW, num_beams=beams, eos_token_id=eos, **opts)
    theirs = hf_generate(tiny.model, PROMPTS, eos, engine.pad_token_id, max_new_tokens=NEW, num_beams=beams,
                         do_sample=False, **opts)
    assert ours == theirs
    greedy = engine.generate(PROMPTS, max_new_tokens=NEW, eos_token_id=eos, **opts)
    assert ours != greedy  # the beams found other replies than greedy decoding


def test_stop_tokens_end_hypotheses_and_settings_matter(engine, tiny, stops):
    """The cases above meet their stop tokens; early_stopping and length_penalty change replies
    (so the comparison with transformers tests their semantics, not only the common path)."""
    ended = engine.generate(PROMPTS, max_new_tokens=NEW, num_beams=4, eos_token_id=stops["B"], early_stopping=True)
    assert any(r[-1] == stops["B"] and len(r) < NEW for r in ended)
    base = engine.generate(PROMPTS, max_new_tokens=NEW, num_beams=4, eos_token_id=-1)
    kw = dict(max_new_tokens=NEW, num_beams=4, length_penalty=2.0)
    for eos in dict.fromkeys(t for r in base for t in r[1:8]):  # a stop token under which early stopping decides
        early = engine.generate(PROMPTS, eos_token_id=eos, early_stopping=True, **kw)
        late = engine.generate(PROMPTS, eos_token_id=eos, **kw)
        if early != late:
            for es, ours in ((True, early), (False, late)):
                assert ours == hf_generate(tiny.model, PROMPTS, eos, engine.pad_token_id, do_sample=False, early_stopping=es, **kw)
            return
    pytest.fail("no stop token made early_stopping matter on this model")


# Stop tokens synthetic:tiny (seed 0) often ranks among its 8 likeliest: they fill every prompt's K
# hypotheses early, so transformers' early-stop heuristic decides when a prompt stops taking them.
# Found by a search over such tokens; the test asserts that they still make the heuristic matter.
HEURISTIC_STOPS = [32951, 34907, 37356]


def test_several_stop_tokens_and_the_early_stop_heuristic_equal_transformers(engine, tiny):
    """early_stopping False (the best running score over its new tokens so far), "never" (over
    max_new_tokens) and True; with several stop tokens each step keeps (1 + stops) * K candidates."""
    kw = dict(max_new_tokens=20, num_beams=2, eos_token_id=HEURISTIC_STOPS[0], stop_token_ids=HEURISTIC_STOPS[1:])
    outs = {es: engine.generate(PROMPTS, early_stopping=es, **kw) for es in (False, "never", True)}
    assert outs[False] != outs["never"], "these stop tokens no longer make the heuristic matter; pick others"
    assert any(len(r) < 5 for r in outs[True])  # a prompt ends early with stop tokens
    hf_kw = dict(max_new_tokens=20, num_beams=2, do_sample=False)
    for es, ours in outs.items():
        assert ours == hf_generate(tiny.model, PROMPTS, HEURISTIC_STOPS, engine.pad_token_id, early_stopping=es, **hf_kw)
    ours = engine.generate(PROMPTS, early_stopping=False, length_penalty=2.0, **kw)
    assert ours == hf_generate(tiny.model, PROMPTS, HEURISTIC_STOPS, engine.pad_token_id, length_penalty=2.0, **hf_kw)


def test_beam_search_with_repetition_penalty_equals_transformers(engine, tiny):
    """One unpadded prompt: transformers also penalizes the padding of a batch's shorter rows."""
    kw = dict(max_new_tokens=NEW, num_beams=3, repetition_penalty=1.5, no_repeat_ngram_size=3)
    ours = engine.generate([PROMPTS[0]], **kw)
    assert ours == hf_generate(tiny.model, [PROMPTS[0]], engine.eos_token_id, engine.pad_token_id, do_sample=False, **kw)


def test_each_prompt_gets_what_it_gets_alone(engine):
    kw = dict(max_new_tokens=NEW, num_beams=3, length_penalty=0.7, no_repeat_ngram_size=2)
    assert engine.generate(PROMPTS, **kw) == [engine.generate([p], **kw)[0] for p in PROMPTS]


@pytest.mark.parametrize("opts", [dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1), dict(min_new_tokens=8),
                                  dict(no_repeat_ngram_size=3, min_new_tokens=5, repetition_penalty=1.3)])
def test_greedy_with_ngram_and_min_new_tokens_equals_transformers(engine, tiny, stops, opts):
    eos = stops["G"]
    rows = PROMPTS if "repetition_penalty" not in opts else [PROMPTS[0]]
    ours = engine.generate(rows, max_new_tokens=NEW, eos_token_id=eos, **opts)
    assert ours == hf_generate(tiny.model, rows, eos, engine.pad_token_id, max_new_tokens=NEW, do_sample=False, **opts)
    assert ours != engine.generate(rows, max_new_tokens=NEW, eos_token_id=eos)  # the options changed the replies


def test_sampling_top_1_with_ngram_and_min_new_tokens_equals_transformers(engine, tiny, stops):
    """top_k=1 makes a draw deterministic: equal only if the bans come before top-k, as in transformers."""
    eos = stops["G"]
    kw = dict(max_new_tokens=NEW, do_sample=True, top_k=1, temperature=0.7, no_repeat_ngram_size=2, min_new_tokens=6)
    ours = engine.generate(PROMPTS, eos_token_id=eos, seed=0, **kw)
    assert ours == hf_generate(tiny.model, PROMPTS, eos, engine.pad_token_id, **kw)


def test_sampling_distribution_follows_transformers_processor_order(engine, tiny):
    """One sampled step: the distribution drawn from, after repetition penalty, n-gram bans,
    min_new_tokens, temperature, top-k and top-p, equals transformers' processed scores."""
    prompt = [464, 2068, 7586, 464, 2068, 11, 464, 7586, 13, 464, 50256, 2068, 18045, 464]  # 464 was followed by 2068, 7586
    opts = dict(do_sample=True, temperature=0.8, top_k=200, top_p=0.9, repetition_penalty=1.2, no_repeat_ngram_size=2,
                min_new_tokens=1)
    req = engine.request(prompt, engine.config(max_new_tokens=4, **opts), stream=False)
    logits = prefilled(engine, [prompt], 4)[1][0]
    ours = req.sampler.warp(req.constrain(logits), req.seen)
    with torch.no_grad():
        out = tiny.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=1, output_scores=True, return_dict_in_generate=True,
                                  pad_token_id=engine.pad_token_id, eos_token_id=engine.eos_token_id, **opts)
    theirs = out.scores[0][0].double().numpy()
    assert np.array_equal(np.isfinite(ours), np.isfinite(theirs))
    assert not np.isfinite(ours[[2068, 7586, engine.eos_token_id]]).any()  # banned, whatever their logits
    p, q = (np.exp(x - x.max()) for x in (ours, theirs))
    assert np.abs(p / p.sum() - q / q.sum()).max() < 1e-5


def test_chat_with_beams(engine):
    chat = engine.chat(max_new_tokens=8, num_beams=3, no_repeat_ngram_size=2)
    chat.send("Hello!")
    expected = engine.generate([chat.turns[0]], max_new_tokens=8, num_beams=3, no_repeat_ngram_size=2)[0]
    assert chat.turns[1][: len(expected)] == expected
    chat.send("And you?")  # every turn runs the whole history: no cache to misuse
    history = [t for turn in chat.turns[:3] for t in turn]
    assert chat.turns[3][:8] == engine.generate([history], max_new_tokens=8, num_beams=3, no_repeat_ngram_size=2)[0][:8]


def test_reorder_follows_parents_and_allocates_nothing(engine):
    """A reordered row continues its parent's sequence; gathering the cache into the second set of
    buffers and swapping allocates nothing per token (the beams' equivalent of the greedy path's test)."""
    def diverged():  # 8 beams of one prompt, each fed its own first token
        dec, _ = prefilled(engine, [PROMPTS[0]] * 8, 40)
        dec.decode(np.arange(100, 108, dtype=np.int64))
        return dec

    parents, fed = np.array([1, 1, 1, 3, 0, 2, 7, 0], np.int64), np.arange(200, 208, dtype=np.int64)
    state, plain = diverged(), diverged()
    state.reorder(parents)
    moved, expected = state.decode(fed[parents]).copy(), plain.decode(fed)
    assert np.abs(moved - expected[parents]).max() < 1e-5
    assert np.abs(moved[0] - moved[4]).max() > 1e-3  # different parents, different continuations
    tokens = np.empty(8, np.int64)
    logits = moved
    buffers = {id(v) for v in state._kv + state._spare}
    for _ in range(3):  # settle first-use caches
        np.argmax(logits, -1, out=tokens)
        state.reorder(parents)
        logits = state.decode(tokens)
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    for _ in range(20):
        np.argmax(logits, -1, out=tokens)
        state.reorder(parents)
        logits = state.decode(tokens)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert {id(v) for v in state._kv + state._spare} == buffers  # two sets, swapped, never remade
    assert peak - base < 16 * 1024, f"{peak - base} bytes allocated at peak over 20 steps"


def test_plain_artifact_refused_with_advice(tiny_plain_artifact):
    """A --no-fuse graph concatenates its cache; the one decode core writes it in place, so the runtime
    refuses such an artifact at load, in one line that says what to do."""
    from gpt2onnx.runtime import Engine

    with pytest.raises(Gpt2OnnxError, match=r"exported with --no-fuse.*re-export without --no-fuse"):
        Engine.load(tiny_plain_artifact, provider="cpu")


BAD = [
    (dict(num_beams=0), "num_beams must be from 1 to 16"), (dict(num_beams=17), "num_beams must be from 1 to 16"),
    (dict(num_beams="2"), "num_beams must be an integer"), (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(num_beams=2, early_stopping="sometimes"), 'early_stopping must be true, false or "never"'),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be >= 0"), (dict(min_new_tokens=-1), "min_new_tokens must be >= 0"),
    (dict(num_beams=2, do_sample=True), "does not sample"), (dict(num_beams=2, logprobs=2), "logprobs is not available"),
]


@pytest.mark.parametrize("kw, match", BAD)
def test_bad_decoding_options_refused_everywhere(engine, kw, match):
    for call in (lambda: engine.generate([[1, 2, 3]], **kw), lambda: engine.generate_text("hi", **kw),
                 lambda: list(engine.stream([1, 2, 3], **kw)), lambda: engine.chat(**kw)):
        with pytest.raises(Gpt2OnnxError, match=match):
            call()


def test_beams_refused_where_tokens_stream(engine):
    with Scheduler(engine) as sched:
        for call in (lambda: list(engine.stream("hi", num_beams=2)), lambda: sched.submit("hi", num_beams=2)):
            with pytest.raises(Gpt2OnnxError, match="cannot stream or run in the Scheduler"):
                call()
        assert sched.submit([1, 2, 3], max_new_tokens=4, no_repeat_ngram_size=1).result(timeout=30).tokens == \
            engine.generate([[1, 2, 3]], max_new_tokens=4, no_repeat_ngram_size=1)[0]  # the bans run there
    with pytest.raises(Gpt2OnnxError, match="PromptCache does not serve beam search"):
        engine.generate([[1, 2, 3]], cache=PromptCache(), num_beams=2)


def test_cli_beam_flags(tiny_artifact, engine):
    r = run_cli("generate", tiny_artifact, "--ids", "464,2068,7586;15496,11", "--json", "--max-new-tokens", "8", "--num-beams", "3",
                "--length-penalty", "0.5", "--early-stopping", "never", "--no-repeat-ngram-size", "2", "--min-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ids"] == engine.generate([[464, 2068, 7586], [15496, 11]], max_new_tokens=8, num_beams=3,
                                                          length_penalty=0.5, early_stopping="never", no_repeat_ngram_size=2,
                                                          min_new_tokens=3)
    r = run_cli("chat", tiny_artifact, "--max-new-tokens", "5", "--num-beams", "2", "--early-stopping", "true", input="Hello!\nHi\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2 and "error" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--num-beams", "0"], "--num-beams must be from 1 to 16"), (["--num-beams", "2", "--sample"], "does not sample"),
    (["--num-beams", "2", "--stream"], "drop --stream or --num-beams"), (["--num-beams", "2", "--length-penalty", "inf"], "--length-penalty must be a finite"),
    (["--min-new-tokens", "-2"], "--min-new-tokens must be >= 0"),
])
def test_cli_bad_beam_values_are_one_line_errors(tiny_artifact, args, needle):
    r = run_cli("generate", tiny_artifact, "Hello", *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpt2onnx: error: ") and needle in lines[0], r.stderr


def test_cli_early_stopping_is_a_closed_choice(tiny_artifact):
    r = run_cli("generate", tiny_artifact, "Hello", "--num-beams", "2", "--early-stopping", "maybe")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "choose from true, false, never" in r.stderr.splitlines()[-1]


def test_beam_speed_harness_runs(engine):
    """benchmarks/beam_speed.py times beams 1 / K at batch 1 for the report (checked for shape, never for time)."""
    from gpt2onnx.benchmarks.beam_speed import measure

    rows = measure(engine, beams=(1, 2), prompt_len=5, new_tokens=3, repeats=1)
    assert [r["num_beams"] for r in rows] == [1, 2] and rows[0]["vs_one_beam"] == 1.0
    assert all(r["ms_per_token"] > 0 and r["batch"] == 1 for r in rows)


def test_stop_strings_end_beams_as_transformers_stop_strings_do(engine, tiny):
    """A stop string ended only the text of the winner of a search that ignored it; transformers' StopStringCriteria
    ends every candidate whose text reaches one, as a hypothesis scored at that length, so another beam can win
    ("uV" below: transformers' reply ends in it after 9 tokens, ours searched on to 10). Stop strings taken from
    unconstrained replies, ASCII (transformers matches vocabulary strings, which miss a character split across
    tokens)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tiny.tokenizer)

    def theirs(p, stop, **kw):
        return hf_generate(tiny.model, [p], engine.eos_token_id, engine.pad_token_id, do_sample=False, stop_strings=[stop],
                           tokenizer=tok, **kw)[0]

    kw = dict(max_new_tokens=10, num_beams=4)
    ours = engine.generate([PROMPTS[0]], stop=["uV"], **kw)[0]
    assert ours == theirs(PROMPTS[0], "uV", **kw) and ours[:6] == engine.generate([PROMPTS[0]], **kw)[0][:6]
    assert engine.decode(ours).endswith("uV") and len(ours) == 9
    rng, checked = np.random.default_rng(0), 0
    for _ in range(40):
        p = rng.integers(100, 50000, int(rng.integers(3, 10))).tolist()
        text = engine.decode(engine.generate([p], **kw)[0])
        pairs = [text[i: i + 2] for i in range(1, len(text) - 2) if text[i: i + 2].isascii() and text[i: i + 2].isprintable()]
        if not pairs or checked >= 8:
            continue
        stop = pairs[int(rng.integers(len(pairs)))]
        for k, opts in ((4, {}), (3, dict(length_penalty=0.6, early_stopping=True))):
            assert engine.generate([p], stop=[stop], **{**kw, "num_beams": k, **opts})[0] == theirs(p, stop, **{**kw, "num_beams": k, **opts})
            checked += 1
    assert checked >= 6, checked
    full = engine.generate_text("Hello there", max_new_tokens=12, num_beams=3)
    stop = full[3:6]  # the text of the hypothesis that ends in a stop string is cut before it
    cut = engine.generate_text("Hello there", max_new_tokens=12, num_beams=3, stop=[stop])
    assert stop and stop not in cut
    tokens = engine.generate([engine.encode("Hello there")], max_new_tokens=12, num_beams=3, stop=[stop])[0]
    assert engine.decode(tokens).startswith(cut) and stop in engine.decode(tokens)


