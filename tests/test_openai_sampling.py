"""OpenAI's sampling fields in the sampler, per request: logit_bias, presence_penalty,
frequency_penalty (over the tokens generated so far in the reply), and min_p; the same in
Engine.generate and the Scheduler."""

from __future__ import annotations

import numpy as np
import pytest

from gpt2onnx.runtime import Gpt2OnnxError, Scheduler
from gpt2onnx.runtime.sampling import GenerationConfig, Sampler

PROMPT = [15, 27, 3, 88, 41]


def test_bias_plus_100_forces_a_token_and_minus_100_bans_it(engine):
    plain = engine.generate([PROMPT], max_new_tokens=6, eos_token_id=-1)[0]
    forced = (plain[0] + 7) % engine.vocab_size
    assert engine.generate([PROMPT], max_new_tokens=6, eos_token_id=-1, logit_bias={forced: 100})[0] == [forced] * 6
    sampled = engine.generate([PROMPT], max_new_tokens=6, eos_token_id=-1, do_sample=True, seed=3, logit_bias={forced: 100.0})[0]
    assert sampled == [forced] * 6
    banned = engine.generate([PROMPT], max_new_tokens=6, eos_token_id=-1, logit_bias={plain[0]: -100})[0]
    assert banned[0] != plain[0] and plain[0] not in banned


def test_the_scheduler_applies_them_per_request(engine):
    """Two requests in one batch, one biased: each gets its own options, as Engine.generate does."""
    kw = dict(max_new_tokens=6, eos_token_id=-1, presence_penalty=1.5, frequency_penalty=0.7)
    want = engine.generate([PROMPT], **kw)[0]
    with Scheduler(engine) as s:
        a = s.submit(PROMPT, **kw)
        b = s.submit(PROMPT, max_new_tokens=6, eos_token_id=-1, logit_bias={5: 100})
        assert a.result().tokens == want and b.result().tokens == [5] * 6


def test_penalties_follow_openais_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=64).astype(np.float32)
    counts = np.zeros(64, np.int32)
    counts[[3, 9, 20]] = [1, 3, 2]
    s = Sampler(GenerationConfig(presence_penalty=0.5, frequency_penalty=0.25))
    want = logits - counts * 0.25 - (counts > 0) * 0.5
    np.testing.assert_allclose(s.warp(logits, counts=counts), want, rtol=0, atol=1e-6)
    assert s.warp(logits, counts=np.zeros(64, np.int32)).tolist() == pytest.approx(logits.tolist())
    # greedy: a token ahead by 0.4 loses to the runner-up once it was generated (presence 0.5)
    row = np.zeros(8, np.float32)
    row[[2, 6]] = [1.4, 1.0]
    seen_once = np.zeros(8, np.int32)
    seen_once[2] = 1
    assert Sampler(GenerationConfig(presence_penalty=0.5))(row, counts=seen_once) == 6
    assert Sampler(GenerationConfig())(row) == 2
    # negative values encourage repeats: the runner-up, generated once, gains 1.0 and wins
    runner_up_once = np.zeros(8, np.int32)
    runner_up_once[6] = 1
    assert Sampler(GenerationConfig(frequency_penalty=-1.0))(row, counts=runner_up_once) == 6


def test_penalties_count_the_reply_not_the_prompt(engine):
    req = engine.request(PROMPT, engine.config(max_new_tokens=8, eos_token_id=-1, frequency_penalty=0.3))
    checked = 0
    for _ in engine.run([req]):
        if not req.done:  # (an ended request drops its counts)
            assert req.counts.tolist() == np.bincount(req.tokens, minlength=engine.vocab_size).tolist()
            checked += 1
    assert checked == 7 and req.counts is None
    assert engine.request(PROMPT, engine.config(max_new_tokens=4)).counts is None  # no penalty: no counting


def test_logit_bias_does_not_write_to_the_shared_logits():
    logits = np.zeros(16, np.float32)
    Sampler(GenerationConfig(logit_bias={3: 100}))(logits)
    assert not logits.any()


def test_min_p_keeps_tokens_near_the_likeliest():
    p = np.array([0.4, 0.3, 0.19, 0.11], np.float64)  # 0.11 / 0.4 = 0.275; 0.19 / 0.4 = 0.475
    logits = np.log(p).astype(np.float32)
    drawn = lambda **kw: {Sampler(GenerationConfig(do_sample=True, seed=s, **kw))(logits) for s in range(300)}  # noqa: E731
    assert drawn(min_p=0.5) == {0, 1}
    assert drawn(min_p=0.3) == {0, 1, 2}
    assert drawn() == {0, 1, 2, 3}


@pytest.mark.parametrize("kw, match", [
    (dict(presence_penalty=2.5), "presence_penalty must be from -2 to 2"),
    (dict(frequency_penalty=-3), "frequency_penalty must be from -2 to 2"),
    (dict(logit_bias={4: 101}), "logit_bias[4] must be from -100 to 100"),
    (dict(logit_bias={-1: 1}), "logit_bias token id must be >= 0"),
    (dict(logit_bias=[1, 2]), "logit_bias must map token ids"),
    (dict(logit_bias={99999999: 1}), "logit_bias token id 99999999 is outside the vocabulary"),
    (dict(min_p=1.5), "min_p must be from 0 to 1"),
    (dict(num_beams=2, min_p=0.1), "not available with num_beams > 1"),
])
def test_bad_values_are_refused_naming_the_field(engine, kw, match):
    with pytest.raises(Gpt2OnnxError) as e:
        engine.generate([PROMPT], max_new_tokens=2, **kw)
    assert match in str(e.value)


def test_a_temperature_under_1e_5_is_greedy_as_in_vllm(tiny_artifact):
    """A temperature of 1e-6 sampled over near-ties (two logits 1 ulp apart drew either); vLLM decodes greedily
    below 1e-5, as temperature 0 does."""
    from gpt2onnx.serve.protocol import CompletionRequest

    kw = CompletionRequest(model="m", prompt="x", temperature=1e-6).generation(16, 64)
    assert kw["do_sample"] is False and "temperature" not in kw
    assert CompletionRequest(model="m", prompt="x", temperature=1e-5).generation(16, 64)["do_sample"] is True


def test_the_draw_never_picks_a_token_the_filters_removed():
    """The inverse-CDF draw compared u with a cumulative sum that can end just below 1: a u past it (1 - 2**-53,
    the largest numpy draws) took the vocabulary's last token even where top-k had removed it."""
    import numpy as np

    from gpt2onnx.runtime.sampling import GenerationConfig, Sampler

    class Top:
        def random(self):
            return 1 - 2**-53

    logits = np.random.default_rng(3).standard_normal(50257).astype(np.float32)
    for trial in range(20):
        s = Sampler(GenerationConfig(do_sample=True, top_k=10, temperature=0.7 + trial / 10))
        s.rng = Top()
        keep = set(np.argsort(-logits)[:10].tolist())
        assert s(logits) in keep
